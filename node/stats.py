"""Counters of what the engine served and fetched, for ``status`` and the metrics."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Upper bounds (seconds) of the origin request latency histogram.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LatencyHistogram:
    """Counts per bucket (the last one is +Inf) and the sum, as Prometheus wants them."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


@dataclass
class EngineStats:
    served_bytes: Counter[str] = field(default_factory=Counter)
    hits: int = 0  # block reads served from the store
    misses: int = 0  # block reads that waited for a fill
    origin_requests: Counter[str] = field(default_factory=Counter)
    origin_errors: Counter[str] = field(default_factory=Counter)
    origin_latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    fetched_bytes: int = 0  # from origins
    peer_bytes: int = 0  # from other nodes
    to_peer_bytes: int = 0  # served to other nodes
    uncached_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def served(self, source: str, n: int) -> None:
        with self._lock:
            self.served_bytes[source] += n
            if source == "local":
                self.hits += 1
            else:
                self.misses += 1

    def fetched(self, n: int, source: str = "origin") -> None:
        with self._lock:
            if source == "peer":
                self.peer_bytes += n
            else:
                self.fetched_bytes += n

    def to_peer(self, n: int) -> None:
        with self._lock:
            self.to_peer_bytes += n

    def uncached(self, n: int) -> None:
        with self._lock:
            self.uncached_bytes += n

    def observe_origin(self, operation: str, seconds: float, error: BaseException | None) -> None:
        with self._lock:
            self.origin_requests[operation] += 1
            self.origin_latency.setdefault(operation, LatencyHistogram()).observe(seconds)
            if error is not None:
                self.origin_errors[type(error).__name__] += 1

    def latency(self) -> dict[str, LatencyHistogram]:
        with self._lock:
            return {
                op: LatencyHistogram(list(h.counts), h.total)
                for op, h in self.origin_latency.items()
            }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "served_bytes": dict(self.served_bytes),
                "hits": self.hits,
                "misses": self.misses,
                "origin_requests": dict(self.origin_requests),
                "origin_errors": dict(self.origin_errors),
                "fetched_bytes": self.fetched_bytes,
                "peer_bytes": self.peer_bytes,
                "to_peer_bytes": self.to_peer_bytes,
                "uncached_bytes": self.uncached_bytes,
            }
