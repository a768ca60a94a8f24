"""Single flight: one piece of work in the air per key, shared by every caller.

The engine fills each block once however many readers, read-aheads, prefetches
and peers want it at the same moment: the first caller for a key opens its flight
(a future) and starts the work, on the pool or in its own thread; later callers
get the same future. A flight lands (is dropped) when its work ends, so a later
call for the key starts it again: the work itself checks whether it is still
needed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Executor, Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Flights(Generic[K, T]):
    """Flights by key; their work runs on ``pool`` or in the caller's thread."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._flights: dict[K, Future[T]] = {}

    def __len__(self) -> int:
        """How many flights are in the air."""
        with self._lock:
            return len(self._flights)

    def submit(self, key: K, work: Callable[[], T]) -> Future[T]:
        """The key's flight; a new one's ``work`` is queued on the pool."""
        future, opened = self._join(key)
        if opened:
            self._pool.submit(self._fly, key, future, work)
        return future

    def run(self, key: K, work: Callable[[], T]) -> Future[T]:
        """The key's flight; a new one's ``work`` runs in this thread before returning."""
        future, opened = self._join(key)
        if opened:
            self._fly(key, future, work)
        return future

    def run_first(self, works: Iterable[tuple[K, Callable[[], T]]]) -> dict[K, Future[T]]:
        """The flights of several keys: of those opened here, the first runs in this
        thread (no queueing behind the pool) once the others are queued on the pool."""
        futures: dict[K, Future[T]] = {}
        own: tuple[K, Future[T], Callable[[], T]] | None = None
        for key, work in works:
            future, opened = self._join(key)
            futures[key] = future
            if opened and own is None:
                own = (key, future, work)
            elif opened:
                self._pool.submit(self._fly, key, future, work)
        if own is not None:
            self._fly(*own)
        return futures

    def _join(self, key: K) -> tuple[Future[T], bool]:
        """The key's flight, and whether this call opened it (then it must start it)."""
        with self._lock:
            future = self._flights.get(key)
            if future is not None:
                return future, False
            future = Future()
            self._flights[key] = future
            return future, True

    def _fly(self, key: K, future: Future[T], work: Callable[[], T]) -> None:
        if not future.set_running_or_notify_cancel():
            self._land(key, future)
            return  # cancelled while queued
        try:
            result = work()
        except BaseException as exc:
            self._land(key, future)
            future.set_exception(exc)
        else:
            self._land(key, future)  # before waiters wake: whoever asks next flies anew
            future.set_result(result)

    def _land(self, key: K, future: Future[T]) -> None:
        with self._lock:
            if self._flights.get(key) is future:
                del self._flights[key]
