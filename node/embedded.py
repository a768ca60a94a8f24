"""Embedded mode: the engine runs in this process when no node daemon is named.

One engine per cache configuration per process: every filesystem instance and CLI
call in the process shares it, so single flight and quotas hold across them. A
forked child (DataLoader workers) builds its own on first use.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cachefs.node.config import load_config
from cachefs.node.engine import Engine, Progress
from cachefs.node.jobs import status_of_progress, status_of_result
from cachefs.node.origins import ObjectRef

from cachefs.api import CachedEntry, JobStatus, ObjectInfo

_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()


def get_engine(
    cache_dir: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Engine:
    """The process's engine for this cache directory / config file."""
    overrides = {"cache_dir": str(cache_dir)} if cache_dir else {}
    environment = {k: v for k, v in os.environ.items() if k.startswith("CACHEFS_")}
    key = (
        os.getpid(),
        json.dumps(
            [str(config or ""), overrides, options or {}, environment], sort_keys=True, default=str
        ),
    )
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine(load_config(config, overrides), options)
            _engines[key] = engine
        return engine


def info_of(ref: ObjectRef, engine: Engine) -> ObjectInfo:
    obj = engine.store.get(ref.id)
    return ObjectInfo(
        url=ref.canonical,
        version=ref.version,
        size=ref.size,
        id=ref.id,
        complete=bool(obj and obj.complete),
        handle=ref,
    )


class EmbeddedClient:
    """A ``CacheClient`` over the process's own engine."""

    def __init__(
        self,
        cache_dir: str | None = None,
        config: str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.engine = get_engine(cache_dir, config, options)

    @property
    def block_size(self) -> int:
        return self.engine.config.block_size

    def stat(self, url: str) -> ObjectInfo:
        return info_of(self.engine.stat(url), self.engine)

    def ls(self, url: str) -> list[dict[str, Any]]:
        from cachefs.urls import parse_url

        parsed = parse_url(url)
        entries = []
        for entry in self.engine.origin.ls(parsed):
            name = entry["name"]
            full = name if "://" in name else parsed.child(name).canonical
            entries.append({**entry, "name": full})
        return entries

    def read(self, info: ObjectInfo, start: int, end: int) -> bytes:
        return self.engine.read_ref(info.handle, start, end)

    def readinto(self, info: ObjectInfo, start: int, into: memoryview) -> None:
        self.engine.readinto_ref(info.handle, start, into)

    def local_path(self, info: ObjectInfo) -> str | None:
        cached = self.engine.store.get(info.id)
        if cached is None or not cached.complete:
            return None
        path = self.engine.store.local_path(cached)
        return str(path) if path is not None else None

    def open_local(self, url: str) -> str:
        return str(self.engine.open_local(url))

    def prefetch(
        self,
        sources: Sequence[str],
        pin: str | None = None,
        tier: str | None = None,
        progress: Callable[[JobStatus], None] | None = None,
        detach: bool = False,
        cluster: bool = False,
    ) -> JobStatus:
        if detach or cluster:
            raise ValueError(
                f"--{'detach' if detach else 'cluster'} needs a node (the job runs there): "
                "name one with --endpoint or CACHEFS_ENDPOINT"
            )

        def on_progress(snapshot: Progress) -> None:
            if progress is not None:
                progress(status_of_progress("embedded", sources, pin, snapshot))

        result = self.engine.prefetch(sources, pin=pin, tier=tier, progress=on_progress)
        return status_of_result("embedded", sources, result)

    def cached(self, source: str | None = None) -> list[CachedEntry]:
        objects = self.engine.matching(source) if source else self.engine.cached()
        return [
            CachedEntry(
                url=o.header.url,
                version=o.header.version,
                size=o.header.size,
                cached_bytes=o.cached_bytes,
                tier=o.tier.name,
                complete=o.complete,
                pinned_by=tuple(self.engine.store.holders(o.id)),
                id=o.id,
            )
            for o in sorted(objects, key=lambda o: o.header.url)
        ]

    def evict(self, sources: Sequence[str]) -> tuple[int, int]:
        evicted = [obj for source in sources for obj in self.engine.evict(source)]
        return len(evicted), sum(obj.charged for obj in evicted)

    def unpin(self, holder: str, sources: Sequence[str] = ()) -> int:
        if sources:
            return sum(self.engine.unpin(holder, source) for source in sources)
        return self.engine.unpin(holder)

    def status(self) -> dict[str, Any]:
        return engine_status(self.engine)


def engine_status(engine: Engine) -> dict[str, Any]:
    """Tiers, pins and counters of ``engine``, as ``cachefs status --json`` prints them."""
    counters = engine.stats.snapshot()
    return {
        "tiers": [vars(usage) for usage in engine.store.usage()],
        "pins": {holder: len(ids) for holder, ids in engine.store.pins().items()},
        "served_bytes": counters["served_bytes"],
        "hits": counters["hits"],
        "misses": counters["misses"],
        "hit_ratio": engine.stats.hit_ratio(),
        "fetched_bytes": counters["fetched_bytes"],
        "jobs": [],
    }
