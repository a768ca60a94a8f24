"""The node's Prometheus metrics, read from the engine and the server at scrape time.

Nothing is counted twice: the collector turns ``EngineStats``, the store's tier usage,
the jobs and the server's call counters into metric families when Prometheus scrapes
``/metrics``. Labels are fixed words (sources, tiers, methods, error kinds), never
URLs or anything a client sent.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from cachefs.node.stats import LATENCY_BUCKETS


class CallStats:
    """What the gRPC server answered: calls by method and code, errors by kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()

    def record(self, method: str, code: str, error_kind: str | None) -> None:
        with self._lock:
            self.calls[(method, code)] += 1
            if error_kind:
                self.errors[error_kind] += 1

    def by_method(self) -> dict[str, int]:
        with self._lock:
            totals: Counter[str] = Counter()
            for (method, _code), count in self.calls.items():
                totals[method] += count
            return dict(totals)

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        with self._lock:
            return dict(self.calls), dict(self.errors)


class NodeCollector:
    """A prometheus_client collector over one node's engine, jobs and server."""

    def __init__(
        self, engine: Any, jobs: Any, calls: CallStats, peers: Any = None, scrubber: Any = None
    ) -> None:
        self._engine, self._jobs, self._calls, self._peers = engine, jobs, calls, peers
        self._scrubber = scrubber

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families are built per scrape

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stats = self._engine.stats.snapshot()
        served = CounterMetricFamily(
            "cachefs_served_bytes", "Bytes served to readers, by source", labels=["source"]
        )
        for source in ("local", "origin", "peer"):
            served.add_metric([source], stats["served_bytes"].get(source, 0))
        yield served
        yield CounterMetricFamily(
            "cachefs_hits", "Block reads served from the store", value=stats["hits"]
        )
        yield CounterMetricFamily(
            "cachefs_misses", "Block reads that waited for a fill", value=stats["misses"]
        )
        yield CounterMetricFamily(
            "cachefs_origin_fetched_bytes",
            "Bytes fetched from origins",
            value=stats["fetched_bytes"],
        )
        yield CounterMetricFamily(
            "cachefs_peer_fetched_bytes",
            "Bytes fetched from other nodes",
            value=stats["peer_bytes"],
        )
        yield CounterMetricFamily(
            "cachefs_peer_served_bytes",
            "Bytes this node served to other nodes",
            value=stats["to_peer_bytes"],
        )
        yield CounterMetricFamily(
            "cachefs_uncached_bytes",
            "Bytes served without caching (no room in any tier)",
            value=stats["uncached_bytes"],
        )

        usage = self._engine.store.usage()
        gauges = {
            "used": ("cachefs_tier_used_bytes", "Bytes a tier's objects take"),
            "quota": ("cachefs_tier_quota_bytes", "A tier's byte quota"),
            "pinned": ("cachefs_tier_pinned_bytes", "Bytes of pinned objects in a tier"),
            "objects": ("cachefs_tier_objects", "Objects in a tier"),
        }
        for attribute, (name, help_text) in gauges.items():
            family = GaugeMetricFamily(name, help_text, labels=["tier", "medium"])
            for tier in usage:
                family.add_metric([tier.name, tier.medium], getattr(tier, attribute))
            yield family
        evictions = CounterMetricFamily(
            "cachefs_evictions", "Objects evicted from a tier", labels=["tier"]
        )
        for tier in usage:
            evictions.add_metric([tier.name], tier.evictions)
        yield evictions
        yield from self._disk_families(CounterMetricFamily, GaugeMetricFamily)

        latency = HistogramMetricFamily(
            "cachefs_origin_request_seconds",
            "Origin request latency, by operation",
            labels=["operation"],
        )
        for operation, histogram in sorted(self._engine.stats.latency().items()):
            latency.add_metric([operation], _cumulative(histogram.counts), histogram.total)
        yield latency
        yield from self._origin_families(CounterMetricFamily, GaugeMetricFamily)

        calls, call_errors = self._calls.snapshot()
        errors = CounterMetricFamily(
            "cachefs_errors", "Errors, by kind (origin requests and node calls)", labels=["kind"]
        )
        kinds: Counter[str] = Counter(stats["origin_errors"])
        kinds.update(call_errors)
        for kind, count in sorted(kinds.items()):
            errors.add_metric([kind], count)
        yield errors
        rpcs = CounterMetricFamily(
            "cachefs_rpcs", "gRPC calls answered, by method and code", labels=["method", "code"]
        )
        for (method, code), count in sorted(calls.items()):
            rpcs.add_metric([method, code], count)
        yield rpcs

        if self._peers is not None:
            yield from self._peer_families(
                CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily
            )
        if self._scrubber is not None:
            yield from self._scrub_families(CounterMetricFamily, GaugeMetricFamily)

        jobs = GaugeMetricFamily("cachefs_jobs", "Prefetch jobs known, by state", labels=["state"])
        states = Counter(job.state for job in self._jobs.jobs())
        for state in ("running", "succeeded", "failed", "cancelled"):
            jobs.add_metric([state], states.get(state, 0))
        yield jobs

    def _disk_families(self, counter: Any, gauge: Any) -> Iterator[Any]:
        """Each tier's disk: I/O errors, whether it is degraded, operations hung."""
        health = self._engine.store.health()
        errors = counter(
            "cachefs_tier_io_errors",
            "I/O errors of a tier's disk (EIO, read-only, device gone), by operation",
            labels=["tier", "operation"],
        )
        degraded = gauge(
            "cachefs_tier_degraded",
            "1 while a tier takes no new data after repeated I/O errors or a hang",
            labels=["tier"],
        )
        stalled = gauge(
            "cachefs_tier_stalled_operations",
            "Disk operations of a tier waiting past the deadline now (the disk hangs)",
            labels=["tier"],
        )
        for tier in health:
            for operation, count in sorted(tier.errors.items()):
                errors.add_metric([tier.tier, operation], count)
            degraded.add_metric([tier.tier], 1 if tier.degraded else 0)
            stalled.add_metric([tier.tier], tier.stalled)
        yield errors
        yield degraded
        yield stalled

    def _origin_families(self, counter: Any, gauge: Any) -> Iterator[Any]:
        """The node's origin slots (the bulkhead) and its breakers."""
        slots, breakers = self._engine.origin.slots, self._engine.origin.breakers
        in_flight = gauge(
            "cachefs_origin_requests_in_flight",
            "Origin requests in flight now, by operation (GETs are read)",
            labels=["operation"],
        )
        now = slots.in_flight()
        for operation in ("stat", "list", "read"):
            in_flight.add_metric([operation], now.get(operation, 0))
        yield in_flight
        yield gauge(
            "cachefs_origin_connections_limit",
            "Origin requests the node allows in flight at once (origin_connections)",
            value=slots.limit,
        )
        yield counter(
            "cachefs_origin_slot_waits",
            "Origin requests that waited for a free slot",
            value=slots.waited,
        )
        if slots.adaptive is not None:  # origin_limit.adaptive
            # The highest host's: a host label would name buckets.
            limits = slots.host_limits().values()
            yield gauge(
                "cachefs_origin_concurrency_limit",
                "Origin requests one host may have in flight now, as adapted (the highest host's)",
                value=max(limits, default=slots.adaptive.initial),
            )
            yield counter(
                "cachefs_origin_limit_cuts",
                "Times push-back (throttling, 5xx, timeouts) halved a host's limit",
                value=slots.cuts(),
            )
        # Totals only: a host label would name buckets (labels never carry those).
        state = breakers.snapshot().values()
        yield gauge(
            "cachefs_origin_breakers_open",
            "Origin hosts whose circuit breaker is open now (their requests fail fast)",
            value=sum(1 for is_open, _ in state if is_open),
        )
        yield counter(
            "cachefs_origin_fail_fast",
            "Requests failed at once because their host's breaker was open",
            value=sum(count for _, count in state),
        )

    def _peer_families(self, counter: Any, histogram: Any, gauge: Any) -> Iterator[Any]:
        stats = self._peers.stats
        with stats.lock:
            blocks = dict(stats.blocks)
            errors = dict(stats.errors)
            latency = {p: (list(h.counts), h.total) for p, h in stats.latency.items()}
        fetched = counter("cachefs_peer_blocks", "Blocks fetched from a peer", labels=["peer"])
        for peer, count in sorted(blocks.items()):
            fetched.add_metric([peer], count)
        yield fetched
        failed = counter(
            "cachefs_peer_errors", "Failed block fetches from a peer", labels=["peer", "kind"]
        )
        for (peer, kind), count in sorted(errors.items()):
            failed.add_metric([peer, kind], count)
        yield failed
        seconds = histogram(
            "cachefs_peer_block_seconds", "Time to fetch one block from a peer", labels=["peer"]
        )
        for peer, (counts, total) in sorted(latency.items()):
            seconds.add_metric([peer], _cumulative(counts), total)
        yield seconds
        avoided = self._peers.avoided()
        backing_off = gauge(
            "cachefs_peer_backoff",
            "1 while a failed peer is avoided (cluster.backoff seconds after a failure)",
            labels=["peer"],
        )
        for peer in sorted({*avoided, *(p for p, _ in errors)}):
            backing_off.add_metric([peer], int(peer in avoided))
        yield backing_off

    def _scrub_families(self, counter: Any, gauge: Any) -> Iterator[Any]:
        status = self._scrubber.status()
        yield counter(
            "cachefs_scrub_bytes", "Block bytes the scrubber read again", value=status.bytes
        )
        bad = counter(
            "cachefs_scrub_bad_blocks",
            "Blocks the scrubber found corrupt or unreadable (discarded), by tier",
            labels=["tier"],
        )
        for tier, count in status.bad_blocks.items():
            bad.add_metric([tier], count)
        yield bad
        yield counter(
            "cachefs_scrub_passes", "Scrub passes completed over every tier", value=status.passes
        )
        yield gauge(
            "cachefs_scrub_last_pass_age_seconds",
            "Seconds since the last scrub pass ended (before the first: since the node started)",
            value=status.since_pass,
        )


def _cumulative(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts as Prometheus wants them: cumulative, labelled by upper bound."""
    bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    total, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def serve_metrics(address: str, collector: NodeCollector) -> tuple[Any, int]:
    """Serve ``/metrics`` on ``address`` (host:port, port 0 picks one): (server, port)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise RuntimeError(
            "the metrics endpoint needs prometheus_client: pip install 'cachefs[node]'"
        ) from None
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    server, _thread = start_http_server(
        int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry
    )
    return server, server.server_address[1]
