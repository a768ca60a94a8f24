"""Disk health per tier: I/O errors and hangs counted, a tier degraded by repeated faults.

A disk that fails (EIO, a filesystem remounted read-only, a device gone) or stops
answering must cost only the reads that touch it. Each tier keeps:

- its I/O errors by operation (``read``, ``write``, ``metadata``), for the metrics;
- the disk operations in flight and since when: one older than ``IO_DEADLINE``
  means the disk hangs (the tier is *stalled*). Reads then skip the tier and are
  served from elsewhere; the operation already waiting on the disk waits on;
- *degraded*: after ``DEGRADE_AFTER`` errors within ``DEGRADE_WINDOW`` seconds, or
  a stall. A degraded tier takes no new objects or blocks (fills go to the next
  tier or are served uncached) and still serves the blocks it holds, each checked
  as always. Once ``RECHECK_SECONDS`` have passed, the next look at the tier starts
  a probe in a thread of its own (the probe may hang too): it writes, syncs, reads
  back and removes a small file, and when that works and nothing is stalled the
  tier is healthy again.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

# A disk operation in flight longer than this means the disk hangs.
IO_DEADLINE = 15.0
# This many I/O errors within the window degrade a tier.
DEGRADE_AFTER = 3
DEGRADE_WINDOW = 60.0
# How long a degraded tier waits before its disk is checked again.
RECHECK_SECONDS = 60.0
# What a failing disk answers (as opposed to a full one, or a file another process
# removed): an I/O error, a filesystem remounted read-only after errors, a device
# or connection gone, a corrupted filesystem (EUCLEAN), an I/O timeout.
FAULT_ERRNOS = frozenset(
    code
    for code in (
        errno.EIO,
        errno.EROFS,
        errno.ENXIO,
        errno.ENODEV,
        errno.ENOTCONN,
        errno.ETIMEDOUT,
        getattr(errno, "EUCLEAN", None),
        getattr(errno, "EREMOTEIO", None),
    )
    if code is not None
)
OPERATIONS = ("read", "write", "metadata")
_PROBE_SIZE = 4096
log = logging.getLogger("cachefs.store")


def is_fault(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk failed (not that it is full, or a file is gone)."""
    return isinstance(exc, OSError) and exc.errno in FAULT_ERRNOS


@dataclass(frozen=True)
class HealthStatus:
    """One tier's disk health, for metrics and messages."""

    tier: str
    degraded: bool
    reason: str  # why it is degraded ("" when it is not)
    errors: dict[str, int] = field(default_factory=dict)  # by operation
    stalled: int = 0  # operations waiting on the disk past the deadline now


class TierHealth:
    """The disk health of one tier; every method is safe from any thread."""

    def __init__(self, name: str, root: Path) -> None:
        self._name = name
        self._root = root
        self._lock = threading.Lock()
        self._errors: Counter[str] = Counter()
        self._recent: deque[float] = deque()
        # Disk operations in flight: token -> (operation, start). Plain dict updates
        # (atomic in CPython): the read path takes no lock for them.
        self._in_flight: dict[int, tuple[str, float]] = {}
        self._tokens = itertools.count()
        self.degraded = False
        self.reason = ""
        self._degraded_at = 0.0
        self._probing = False

    @contextmanager
    def watch(self, operation: str) -> Iterator[None]:
        """Around one disk operation: in flight (and so watched for a hang) while it runs."""
        token = next(self._tokens)
        self._in_flight[token] = (operation, time.monotonic())
        try:
            yield
        finally:
            self._in_flight.pop(token, None)

    def stalled(self) -> bool:
        """Whether a disk operation has been waiting past the deadline (it degrades the
        tier): new reads must not touch the disk, or they wait as long."""
        if not self._in_flight:
            return False
        now = time.monotonic()
        waiting = [(start, op) for op, start in tuple(self._in_flight.values())]
        if not waiting:
            return False
        start, operation = min(waiting)
        if now - start < IO_DEADLINE:
            return False
        self._degrade(
            f"a disk {operation} has not returned for {now - start:.0f}s (the deadline is "
            f"{IO_DEADLINE:g}s): the disk hangs"
        )
        return True

    def usable(self) -> bool:
        """Whether new objects and blocks may go to this tier."""
        if self.stalled():
            return False
        if not self.degraded:
            return True
        self._maybe_probe()
        return False

    def fault(self, operation: str, what: str, exc: OSError) -> None:
        """An I/O error of this tier's disk: counted and logged; repeated, it degrades
        the tier. ``what``: what was being done, for the log."""
        now = time.monotonic()
        with self._lock:
            self._errors[operation] += 1
            self._recent.append(now)
            while self._recent and now - self._recent[0] > DEGRADE_WINDOW:
                self._recent.popleft()
            recent = len(self._recent)
        cause = exc.strerror or str(exc)
        log.warning(
            "tier %r: %s error (%s) on %s",
            self._name,
            operation,
            cause,
            what,
        )
        if recent >= DEGRADE_AFTER:
            self._degrade(
                f"{recent} I/O errors within {DEGRADE_WINDOW:g}s (the last: {cause} on {what})"
            )

    def status(self) -> HealthStatus:
        """A snapshot; on a degraded tier due a check, it starts one."""
        stalled = self.stalled()
        if self.degraded:
            self._maybe_probe()
        now = time.monotonic()
        starts = [start for _op, start in tuple(self._in_flight.values())]
        late = sum(1 for start in starts if now - start >= IO_DEADLINE) if stalled else 0
        with self._lock:
            errors = {op: self._errors.get(op, 0) for op in OPERATIONS}
            return HealthStatus(self._name, self.degraded, self.reason, errors, late)

    def _degrade(self, reason: str) -> None:
        with self._lock:
            if self.degraded:
                return
            self.degraded, self.reason = True, reason
            self._degraded_at = time.monotonic()
        log.warning(
            "tier %r (%s) is degraded: %s; new objects and blocks go to the next tier or are "
            "served uncached until a check of the disk succeeds (every %gs); check the disk "
            "(dmesg, SMART) or take the tier out of the config",
            self._name,
            self._root,
            reason,
            RECHECK_SECONDS,
        )

    def _maybe_probe(self) -> None:
        with self._lock:
            if self._probing or time.monotonic() - self._degraded_at < RECHECK_SECONDS:
                return
            self._probing = True
        threading.Thread(
            target=self._probe, name=f"cachefs-disk-check-{self._name}", daemon=True
        ).start()

    def _probe(self) -> None:
        """Write, sync, read back and remove a small file; healthy again if all works."""
        path = self._root / "v1" / f".health-{os.getpid()}-{threading.get_ident()}"
        payload = os.urandom(_PROBE_SIZE)
        error: OSError | None = None
        try:
            with self.watch("metadata"):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                    back = os.pread(fd, _PROBE_SIZE, 0)
                finally:
                    os.close(fd)
                os.unlink(path)
            if back != payload:
                error = OSError(errno.EIO, "read back other bytes than written")
        except OSError as exc:
            error = exc
            with suppress(OSError):
                path.unlink()
        stalled = self.stalled()
        with self._lock:
            self._probing = False
            if error is None and not stalled:
                self.degraded, self.reason = False, ""
                self._recent.clear()
            else:
                self._degraded_at = time.monotonic()
        if error is None and not stalled:
            log.warning("tier %r (%s) works again: it takes new data", self._name, self._root)
        else:
            log.info("tier %r is still degraded: its check failed (%s)", self._name, error)
