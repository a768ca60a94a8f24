"""The scrubber: every stored block read again, slowly, to find bits that rot on the disk.

A block is verified once per process and then served without a check, so a bit that
flips on the disk afterwards would be served until a restart. ``cachefs node`` runs
one scrubber thread (embedded mode does not: its processes come and go). In passes
over every tier and object, it reads each recorded block again and compares it with
the xxh3 recorded when the block arrived, whether or not it was verified. A block
that fails, or cannot be read, is discarded as a corrupt block a reader finds is
(``Store.check_block``): repaired in place, or into a new file when the file may be
held, or its object retired; the next read fetches it again.

Reads are paced to ``scrub.rate`` bytes per second: chunks of about a sixteenth of a
second's worth (a page to 1 MiB) into one reused buffer, each followed by the wait
the rate asks for, so readers never meet a burst. No store-wide lock is held while
the disk is read. Objects filled, repaired or evicted meanwhile are fine: what went
away is skipped, what arrived is checked in the next pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from cachefs.node import layout
from cachefs.node.config import ScrubConfig
from cachefs.node.store import CachedObject, Store
from cachefs.units import format_size

log = logging.getLogger("cachefs.scrub")

_MAX_CHUNK = 1024 * 1024
_READS_PER_SECOND = 16
# A pass that found no block to check waits at least this long: no busy loop on an
# empty store when the pause is 0.
_IDLE_SECONDS = 1.0


class _Stopping(BaseException):
    """Ends the scrubber's thread from inside a read; a BaseException, so that the
    per-object error handling does not take it for one object's trouble."""


@dataclass(frozen=True)
class ScrubStatus:
    """What the scrubber did since the node started, for the metrics endpoint."""

    bytes: int  # block bytes read and checked
    bad_blocks: dict[str, int]  # blocks that failed, by tier (every tier named)
    passes: int  # complete passes over every tier
    since_pass: float  # seconds since the last pass ended (before the first: since start)


def chunk_size(rate: int) -> int:
    """Bytes per read at ``rate``: a sixteenth of a second's worth, a page to 1 MiB."""
    wanted = rate // _READS_PER_SECOND // layout.PAGE * layout.PAGE
    return min(_MAX_CHUNK, max(layout.PAGE, wanted))


class Scrubber:
    """The node's scrubbing thread over one store; ``start`` once, ``stop`` once."""

    def __init__(self, store: Store, config: ScrubConfig) -> None:
        if config.rate <= 0:
            raise ValueError("a scrubber needs a rate above 0 (scrub.rate 0 means no scrubber)")
        self._store = store
        self._rate = config.rate
        self._pause = config.pause
        self._buffer = memoryview(bytearray(chunk_size(config.rate)))
        self._stop = threading.Event()
        self._due = time.monotonic()  # when the bytes read so far are paid for
        self._lock = threading.Lock()  # over the counters below
        self._bytes = 0
        self._bad: Counter[str] = Counter()
        self._passes = 0
        self._last_pass = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="cachefs-scrub", daemon=True)

    def start(self) -> None:
        log.info(
            "scrubber: every stored block is read again at %s/s, %g s between passes",
            format_size(self._rate),
            self._pause,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop after the chunk being read (a repair under way finishes first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def status(self) -> ScrubStatus:
        with self._lock:
            return ScrubStatus(
                bytes=self._bytes,
                bad_blocks={t.name: self._bad[t.name] for t in self._store.tiers},
                passes=self._passes,
                since_pass=time.monotonic() - self._last_pass,
            )

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                checked = self._pass()
                pause = self._pause if checked else max(self._pause, _IDLE_SECONDS)
                self._stop.wait(pause)
        except _Stopping:
            return

    def _pass(self) -> int:
        """One pass over every object of every tier; the number of blocks checked."""
        started = time.monotonic()
        objects = self._store.objects()
        checked = bad = 0
        for obj in objects:
            try:
                done, failed = self._scrub(obj)
            except Exception:  # one object's trouble must not end the scrubbing of all
                log.exception("scrub of %s failed; going on with the next object", obj.header.url)
                continue
            checked += done
            bad += failed
        with self._lock:
            self._passes += 1
            self._last_pass = time.monotonic()
            passes = self._passes
        log.info(
            "scrub pass %d: %d blocks of %d objects checked in %.1f s, %d bad",
            passes,
            checked,
            len(objects),
            time.monotonic() - started,
            bad,
            extra={"scrub_pass": passes, "blocks": checked, "bad_blocks": bad},
        )
        return checked

    def _scrub(self, obj: CachedObject) -> tuple[int, int]:
        """Every block ``obj`` has recorded now: (checked, failed)."""
        checked = failed = 0
        for index in sorted(obj.present):
            if self._stop.is_set():
                raise _Stopping
            if obj.retired:  # evicted or retired meanwhile: nothing left to check
                break
            verdict = self._store.check_block(obj, index, self._buffer, self._paced)
            if verdict is None:
                continue
            checked += 1
            if not verdict:
                failed += 1
                self._found(obj, index)
        return checked, failed

    def _found(self, obj: CachedObject, index: int) -> None:
        tier = obj.tier.name
        with self._lock:
            self._bad[tier] += 1
        log.warning(
            "scrub: block %d of %s in tier %s does not match its checksum; discarded, the "
            "next read fetches it again",
            index,
            obj.header.url,
            tier,
            extra={"url": obj.header.url, "block": index, "tier": tier},
        )

    def _paced(self, size: int) -> None:
        """After each chunk read: count it, then wait until the rate has paid for it.

        Time lost elsewhere (a slow disk, a repair, the pause) is not made up later
        in a burst: the schedule never starts before now.
        """
        with self._lock:
            self._bytes += size
        self._due = max(self._due + size / self._rate, time.monotonic())
        if self._stop.wait(max(0.0, self._due - time.monotonic())):
            raise _Stopping
