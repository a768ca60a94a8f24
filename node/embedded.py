"""Embedded mode: the engine runs in this process when no node daemon is named.

One service (and engine) per cache configuration per process: every filesystem
instance and CLI call in the process shares it, so single flight and quotas hold
across them. A forked child (DataLoader workers) builds its own on first use.
``EmbeddedClient`` is a ``CacheClient`` over that service, as ``NodeClient`` is over
a node's: the operations themselves are the service's. Its caller is this process,
which owns the cache: the policy does not apply.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cachefs.node.callers import IN_PROCESS
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.node.service import CacheService
from cachefs.types import (
    CachedEntry,
    EvictResult,
    JobStatus,
    ModelInfo,
    NodeStatus,
    ObjectInfo,
    ViewInfo,
)

_services: dict[tuple[int, str], CacheService] = {}
_lock = threading.Lock()


def get_service(
    cache_dir: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> CacheService:
    """The process's service for this cache directory / config file / origin options."""
    overrides = {"cache_dir": str(cache_dir)} if cache_dir else {}
    environment = {k: v for k, v in os.environ.items() if k.startswith("CACHEFS_")}
    key = (
        os.getpid(),
        json.dumps(
            [str(config or ""), overrides, options or {}, environment], sort_keys=True, default=str
        ),
    )
    with _lock:
        service = _services.get(key)
        if service is None:
            service = CacheService(Engine(load_config(config, overrides), options))
            _services[key] = service
        return service


class EmbeddedClient:
    """A ``CacheClient`` over the process's own service."""

    def __init__(
        self,
        cache_dir: str | None = None,
        config: str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.service = get_service(cache_dir, config, options)
        self.engine = self.service.engine

    @property
    def block_size(self) -> int:
        return self.engine.config.block_size

    def stat(self, url: str) -> ObjectInfo:
        return self.service.stat(IN_PROCESS, url)

    def ls(self, url: str) -> list[dict[str, Any]]:
        return self.service.ls(IN_PROCESS, url)

    def read(self, info: ObjectInfo, start: int, end: int) -> bytes:
        return self.engine.read_ref(info.handle, start, end)

    def readinto(self, info: ObjectInfo, start: int, into: memoryview) -> None:
        self.engine.readinto_ref(info.handle, start, into)

    def local_path(self, info: ObjectInfo) -> str | None:
        found = self.service.data_file(info.id)
        return found[0] if found else None

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
        return self.service.prefetch(IN_PROCESS, sources, pin, tier, progress)

    def cached(self, source: str | None = None) -> list[CachedEntry]:
        return self.service.cached(IN_PROCESS, source)

    def evict(self, sources: Sequence[str]) -> EvictResult:
        return self.service.evict(IN_PROCESS, sources)

    def cancel(self, job_id: str) -> JobStatus:
        return self.service.cancel(IN_PROCESS, job_id)

    def unpin(self, holder: str, sources: Sequence[str] = ()) -> int:
        return self.service.unpin(IN_PROCESS, holder, sources)

    def view(
        self,
        holder: str,
        sources: Sequence[str],
        tier: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> ViewInfo:
        return self.service.view(IN_PROCESS, holder, sources, tier, model, version)

    def model(self, namespace: str, name: str) -> ModelInfo:
        return self.service.model(IN_PROCESS, namespace, name)

    def status(self) -> NodeStatus:
        return self.service.status(IN_PROCESS)
