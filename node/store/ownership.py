"""Who may write a cache directory: one node alone, or processes in embedded mode.

A node keeps an index, quotas and pins of its directory in memory; a process that
wrote there behind its back (an embedded prefetch on the default directory) would
add objects the node neither lists nor evicts, and the two quotas would diverge. So
each tier root carries a ``LOCK`` file: a node holds an exclusive ``flock`` on it,
with its pid and endpoint written inside; embedded processes hold shared locks, so
several of them (a data loader's workers) may share a directory that no node owns.
Whoever comes second is refused with a message that names the owner and, for an
embedded process, the node's endpoint to use instead.

A draining node lets go of its directories when it stops taking calls, so the node
that replaces it (a rolling upgrade) may start while the old one finishes the calls
in flight; a node that finds another node's lock waits for it up to ``NODE_WAIT``
seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cachefs.errors import CacheDirError

LOCK_FILE = "LOCK"
NODE_WAIT = 30.0  # seconds a starting node waits for the node it replaces
_POLL = 0.1
log = logging.getLogger("cachefs.store")


@dataclass(frozen=True)
class Owner:
    """The process claiming a directory: a node (``endpoint``: where clients reach
    it) or, with ``node=False``, embedded mode."""

    node: bool = False
    endpoint: str = ""


EMBEDDED = Owner()


class Claim:
    """A held lock on one tier root; ``release`` lets it go (idempotent)."""

    def __init__(self, root: Path, fd: int) -> None:
        self.root = root
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):  # a disk gone away: the descriptor is gone too
                os.close(fd)  # closing the last descriptor drops the flock


def claim(root: Path, owner: Owner) -> Claim:
    """Lock ``root`` for ``owner``, or raise ``CacheDirError`` naming who holds it."""
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o644)  # whatever the umask: readable, writable by its owner only
    except PermissionError:  # another user's directory: reading is enough to lock
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _lock(fd, root, owner)
        if owner.node:
            record = {"pid": os.getpid(), "endpoint": owner.endpoint}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    except BaseException:
        os.close(fd)
        raise
    return Claim(root, fd)


def _lock(fd: int, root: Path, owner: Owner) -> None:
    mode = fcntl.LOCK_EX if owner.node else fcntl.LOCK_SH
    deadline = time.monotonic() + (NODE_WAIT if owner.node else 0.0)
    waited = False
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        holder = _node_holding(fd)
        if holder is None or time.monotonic() >= deadline:  # only a node is waited for
            raise CacheDirError(_refusal(root, owner, holder))
        if not waited:
            waited = True
            log.info(
                "cache directory %s is held by %s: waiting up to %.0f s for it",
                root,
                _describe(holder),
                NODE_WAIT,
            )
        time.sleep(_POLL)


def _node_holding(fd: int) -> dict[str, object] | None:
    """The record a node wrote into the lock file, if a node holds it."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
        if isinstance(record, dict) and _alive(record.get("pid")):
            return record
    return None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, object] | None) -> str:
    if holder is None:
        return (
            "cachefs in embedded mode (a Python process, or a cachefs command without --endpoint)"
        )
    return f"the cachefs node with pid {holder['pid']}"


def _refusal(root: Path, owner: Owner, holder: dict[str, object] | None) -> str:
    if owner.node:
        return (
            f"cache directory {root} is in use by {_describe(holder)}: one node owns a "
            "directory, and processes in embedded mode must not share it with one; stop "
            "them (clients of a node name its endpoint), or give this node another "
            "directory (--cache-dir, CACHEFS_CACHE_DIR, or the tier's path)"
        )
    endpoint = str(holder.get("endpoint") or "") if holder else ""
    use = (
        f"ask the node instead: --endpoint {endpoint} or CACHEFS_ENDPOINT={endpoint}"
        if endpoint
        else "ask the node instead: its endpoint in --endpoint or CACHEFS_ENDPOINT"
    )
    return (
        f"cache directory {root} belongs to {_describe(holder)}, whose index and quota "
        f"a process in embedded mode would bypass: {use}, or use another directory "
        "(--cache-dir or CACHEFS_CACHE_DIR)"
    )
