"""What every cache client offers, and ``connect`` which picks one.

A client is either a ``NodeClient`` (``cachefs.client``: gRPC to the node named by
``CACHEFS_ENDPOINT`` or ``endpoint=``) or an ``EmbeddedClient`` (``cachefs.node.embedded``:
the engine in this process, on a local cache directory). The fsspec filesystem and
the CLI are written against ``CacheClient`` only, so both modes behave alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

ENDPOINT_ENV = "CACHEFS_ENDPOINT"

JOB_STATES = ("running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class ObjectInfo:
    """One origin object at one version: what a reader pins itself to."""

    url: str  # canonical: no userinfo, no signing query string
    version: str
    size: int
    id: str
    complete: bool = False
    # A complete object's verified data file as its node sees it, and its inode.
    local_path: str | None = None
    inode: int = 0
    # The embedded engine's own reference (None in client mode).
    handle: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class JobStatus:
    """A prefetch job's byte-level progress, and its outcome once it ends."""

    id: str
    state: str
    sources: tuple[str, ...]
    pin_holder: str | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    objects_total: int = 0
    objects_done: int = 0
    fetched_bytes: int = 0  # from origins
    peer_bytes: int = 0  # from other nodes of the cluster
    cached_before: int = 0
    evicted_during: int = 0
    seconds: float = 0.0
    error: str | None = None
    error_kind: str | None = None
    nodes_total: int = 0  # a cluster prefetch: members it runs on, and those done
    nodes_done: int = 0

    @property
    def elapsed(self) -> float:
        return self.seconds

    @property
    def finished(self) -> bool:
        return self.state != "running"


@dataclass(frozen=True)
class CachedEntry:
    """One cached object, as ``cachefs ls`` shows it."""

    url: str
    version: str
    size: int
    cached_bytes: int
    tier: str
    complete: bool
    pinned_by: tuple[str, ...]
    id: str


class CacheClient(Protocol):
    """The operations the fsspec filesystem and the CLI need, in either mode."""

    def stat(self, url: str) -> ObjectInfo:
        """The object's current version; IsADirectoryError for a prefix."""

    def ls(self, url: str) -> list[dict[str, Any]]:
        """The origin's listing under ``url`` (fsspec ``info`` dicts, full URLs as names)."""

    def read(self, info: ObjectInfo, start: int, end: int) -> bytes:
        """Bytes [start, end) of the pinned version (``end`` clipped to the size)."""

    def readinto(self, info: ObjectInfo, start: int, into: memoryview) -> None:
        """Fill ``into`` with the pinned version's bytes from ``start``."""

    def local_path(self, info: ObjectInfo) -> str | None:
        """A path this process can read the complete object from, or None."""

    def open_local(self, url: str) -> str:
        """Fetch the object if needed and return a local path of its verified file."""

    def prefetch(
        self,
        sources: Sequence[str],
        pin: str | None = None,
        tier: str | None = None,
        progress: Callable[[JobStatus], None] | None = None,
        detach: bool = False,
        cluster: bool = False,
    ) -> JobStatus:
        """Fetch every object of ``sources``; the final status (or the first, detached).
        ``cluster``: onto every node of the node's cluster."""

    def cached(self, source: str | None = None) -> list[CachedEntry]: ...

    def evict(self, sources: Sequence[str]) -> tuple[int, int]:
        """Evict what ``sources`` name: (objects, bytes freed)."""

    def unpin(self, holder: str, sources: Sequence[str] = ()) -> int: ...

    def status(self) -> dict[str, Any]: ...

    @property
    def block_size(self) -> int: ...


def connect(
    endpoint: str | None = None,
    cache_dir: str | None = None,
    config: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    timeout: float | None = None,
) -> CacheClient:
    """A client of the node at ``endpoint`` (else ``CACHEFS_ENDPOINT``), else embedded.

    ``options`` (origin storage options) are used in embedded mode only: a node reads
    origins with its own credentials.
    """
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
    if endpoint:
        if cache_dir or config:
            raise ValueError(
                "cache_dir and config configure an embedded cache; with an endpoint the "
                "node's own configuration applies"
            )
        from cachefs.client import get_client

        return get_client(endpoint, timeout=timeout)
    from cachefs.node.embedded import EmbeddedClient

    return EmbeddedClient(cache_dir, config, options)
