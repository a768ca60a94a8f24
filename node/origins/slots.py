"""The node's one limit on origin requests in flight (a bulkhead), and each origin
host's adaptive limit.

Prefetch jobs, readers filling their first block in their own thread, and fills a
peer forwards all take a slot for each origin request (stat, list, ranged GET) and
give it back when the request ends; no slot is held while a retry waits. So however
many callers there are, at most ``limit`` requests are in flight at the origin.

With adaptation on, each request is also counted for its host (``adaptive.py``):
the host's limit rises while more requests in flight bring more bytes per second
and is cut on push-back, and the engine's fill pool runs as many fills at once as
the busiest host's limit allows (``fill_pool.py``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

from cachefs.node.origins.adaptive import HostRequests, Settings
from cachefs.node.origins.fill_pool import FillPool

# A host whose last request started longer ago than this no longer sets the pool's width.
ACTIVE_SECONDS = 10.0


class OriginSlots:
    def __init__(self, limit: int, adaptive: Settings | None = None) -> None:
        """``adaptive``: each host's own limit; None: a fixed fill pool, hosts share
        ``limit`` freely."""
        self.limit = limit
        self.adaptive = adaptive
        self._free = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._hosts: dict[str, HostRequests] = {}
        self.waited = 0  # requests that found every slot taken

    @contextmanager
    def held(self, operation: str, host: str = "", nbytes: int = 0) -> Iterator[None]:
        """A slot for one request of ``operation`` (``stat``, ``list``, ``read``) to
        ``host``; ``nbytes``: what a read brings when it succeeds (the host's rate)."""
        if not self._free.acquire(blocking=False):
            with self._lock:
                self.waited += 1
            self._free.acquire()
        with self._lock:
            self._in_flight[operation] += 1
        requests = self._host(host)
        try:
            with requests.held(nbytes) if requests is not None else nullcontext():
                yield
        finally:
            with self._lock:
                self._in_flight[operation] -= 1
            self._free.release()

    def _host(self, host: str) -> HostRequests | None:
        if self.adaptive is None:
            return None
        with self._lock:
            requests = self._hosts.get(host)
            if requests is None:
                requests = self._hosts[host] = HostRequests(self.adaptive.new(host))
            return requests

    def fill_pool(self, threads: int, name: str) -> ThreadPoolExecutor:
        """The engine's fill pool: ``threads`` wide, or with adaptation as wide as
        ``width()`` (threads for the ceiling, the rest waiting)."""
        if self.adaptive is None:
            return ThreadPoolExecutor(threads, thread_name_prefix=name)
        return FillPool(max(threads, self.adaptive.ceiling), self.width, name)

    def width(self) -> int:
        """Fills the node runs at once: the highest limit among hosts asked in the last
        ``ACTIVE_SECONDS`` (where each starts, before any is)."""
        assert self.adaptive is not None
        now = time.monotonic()
        with self._lock:
            hosts = list(self._hosts.values())
        active = [h.control.limit for h in hosts if now - h.last_start < ACTIVE_SECONDS]
        return max(active, default=self.adaptive.initial)

    def in_flight(self) -> dict[str, int]:
        """Requests in flight now, by operation."""
        with self._lock:
            return {op: n for op, n in self._in_flight.items() if n}

    def host_limits(self) -> dict[str, int]:
        """Each host's adaptive limit now (empty without adaptation). Hosts are names
        such as buckets: for logs and tests, never for metric labels."""
        with self._lock:
            hosts = dict(self._hosts)
        return {host: requests.control.limit for host, requests in hosts.items()}

    def cuts(self) -> int:
        """Times push-back lowered a host's limit, all hosts together."""
        with self._lock:
            hosts = list(self._hosts.values())
        return sum(requests.control.cuts for requests in hosts)
