"""One limit on the origin requests of a node: a bulkhead shared by every caller.

Prefetch jobs, readers filling their first block in their own thread, and fills a
peer forwards all take a slot for each origin request (stat, list, ranged GET) and
give it back when the request ends; no slot is held while a retry waits. So however
many callers there are, at most ``limit`` requests are in flight at the origin.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class OriginSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self.waited = 0  # requests that found every slot taken

    @contextmanager
    def held(self, operation: str) -> Iterator[None]:
        """A slot for one request of ``operation`` (``stat``, ``list``, ``read``)."""
        if not self._free.acquire(blocking=False):
            with self._lock:
                self.waited += 1
            self._free.acquire()
        with self._lock:
            self._in_flight[operation] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[operation] -= 1
            self._free.release()

    def in_flight(self) -> dict[str, int]:
        """Requests in flight now, by operation."""
        with self._lock:
            return {op: n for op, n in self._in_flight.items() if n}
