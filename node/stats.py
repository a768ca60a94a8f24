"""Counters of what the engine served and fetched, for ``status`` and, later, metrics."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    served_bytes: Counter[str] = field(default_factory=Counter)
    origin_requests: Counter[str] = field(default_factory=Counter)
    origin_errors: Counter[str] = field(default_factory=Counter)
    origin_seconds: float = 0.0
    fetched_bytes: int = 0
    uncached_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def served(self, source: str, n: int) -> None:
        with self._lock:
            self.served_bytes[source] += n

    def fetched(self, n: int) -> None:
        with self._lock:
            self.fetched_bytes += n

    def uncached(self, n: int) -> None:
        with self._lock:
            self.uncached_bytes += n

    def observe_origin(self, operation: str, seconds: float, error: BaseException | None) -> None:
        with self._lock:
            self.origin_requests[operation] += 1
            self.origin_seconds += seconds
            if error is not None:
                self.origin_errors[type(error).__name__] += 1

    def hit_ratio(self) -> float | None:
        with self._lock:
            total = sum(self.served_bytes.values())
            return self.served_bytes["local"] / total if total else None

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "served_bytes": dict(self.served_bytes),
                "origin_requests": dict(self.origin_requests),
                "origin_errors": dict(self.origin_errors),
                "fetched_bytes": self.fetched_bytes,
                "uncached_bytes": self.uncached_bytes,
            }
