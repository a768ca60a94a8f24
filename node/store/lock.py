"""The store's lock: held for bookkeeping, never across disk I/O.

Every reader of every tier takes the store's lock, if only for a moment; a thread
that held it while a disk hung would stop them all. So the disk work that
bookkeeping decides (moving a retired object's directory into the trash and
deleting it) is deferred: it runs in the same thread once that thread holds the
lock no more, when its outermost ``with`` ends or when it waits on the store's
condition. A hanging disk then holds up only the thread that touched it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("cachefs.store")


class StoreLock:
    """A reentrant lock with work deferred to its release; a ``threading.Condition``
    can be built on it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        self._local.depth = self._depth() + 1
        return True

    def release(self) -> None:
        self._local.depth = self._depth() - 1
        self._lock.release()
        if self._local.depth == 0:
            self._run_deferred()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def defer(self, work: Callable[[], None]) -> None:
        """Run ``work`` once this thread holds the lock no more (now, if it does not).
        ``work`` should not raise: what it raises is logged."""
        if self._depth() == 0:
            _run(work)
            return
        pending = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        pending.append(work)

    def _run_deferred(self) -> None:
        pending = getattr(self._local, "pending", None)
        while pending:
            _run(pending.pop(0))

    # What threading.Condition uses to wait: the lock is released whole, and the
    # work deferred so far runs before the wait.

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined]

    def _release_save(self) -> tuple[Any, int]:
        saved = (self._lock._release_save(), self._depth())  # type: ignore[attr-defined]
        self._local.depth = 0
        self._run_deferred()
        return saved

    def _acquire_restore(self, saved: tuple[Any, int]) -> None:
        state, depth = saved
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]
        self._local.depth = depth


def _run(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:
        log.exception("deferred store work failed")
