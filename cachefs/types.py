"""The contract's data types, and ``CacheClient``: what every cache client offers.

The node's service layer returns these types, the gRPC messages carry them
(``cachefs.messages``), and both clients hand them to the fsspec filesystem, the
loaders and the CLI: a ``NodeClient`` (``cachefs.client``, gRPC to a node) and an
``EmbeddedClient`` (``cachefs.node.embedded``, the engine in this process). So a
result looks the same whichever mode produced it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    # What reads name the object by: the embedded engine's own reference, or for a
    # node the URL as the caller gave it (a signed URL stays signed).
    handle: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class JobStatus:
    """A prefetch's byte-level progress, and its outcome once it ends."""

    id: str
    state: str  # one of JOB_STATES
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
    # What the object is checked against: the origin's digest algorithm ("crc64nvme",
    # "sha256", ...) once the complete object matched it, "pending" before that,
    # "blocks" when the origin publishes no digest (each block's xxh3 only),
    # "unverifiable" when its digest cannot be checked (an S3 composite checksum).
    verified: str = "blocks"
    # The origin reported another version of the URL since: evicted before the rest.
    superseded: bool = False


@dataclass(frozen=True)
class EvictResult:
    """What an eviction removed."""

    objects: int
    bytes: int


@dataclass(frozen=True)
class ViewInfo:
    """A holder's view: its directory on the node, and what it holds."""

    path: str
    objects: int
    bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """A CachedModel as one node holds it: what a volume that names it mounts."""

    namespace: str
    name: str
    # The source of the version ready here (else of the spec): what a pod must be
    # allowed to view to mount the model.
    source: str
    version: str  # the version ready on this node, the one a new volume gets ("": none)
    phase: str  # this node's: Pending, Filling, Ready, Failed, NotSelected, Deleting
    target: str = ""  # the version status.resolved names (what this node fills or holds)
    bytes_done: int = 0  # of the target, on this node
    bytes_total: int = 0
    error: str = ""  # why it failed or is not selected here, what to do
    tier: str | None = None  # spec.tier


@dataclass(frozen=True)
class TierStatus:
    """One tier's space: bytes used, reserved for fills in flight, pinned."""

    name: str
    medium: str
    path: str
    quota: int
    used: int
    reserved: int
    high_water: int  # the most ``used + reserved`` ever reached
    pinned: int
    objects: int
    evictions: int
    state: str = "ok"  # "degraded": its disk failed; it takes no new data until it recovers
    reason: str = ""  # why it is degraded


@dataclass(frozen=True)
class NodeStatus:
    """Everything ``cachefs status`` shows, in either mode."""

    node_id: str
    tiers: tuple[TierStatus, ...]
    pins: Mapping[str, int]  # holder -> objects pinned
    jobs: tuple[JobStatus, ...]
    served_bytes: Mapping[str, int]  # by source: local, origin, peer
    hits: int
    misses: int
    fetched_bytes: int
    rpcs: Mapping[str, int] = field(default_factory=dict)  # calls by method (a node)
    uptime_seconds: float = 0.0
    members: tuple[str, ...] = ()  # the cluster's nodes as this one sees them
    block_port: int = 0  # where peers fetch blocks (HTTP/1.1); 0: no cluster

    @property
    def hit_ratio(self) -> float | None:
        """The share of served bytes that came from the cache."""
        total = sum(self.served_bytes.values())
        return self.served_bytes.get("local", 0) / total if total else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {**dataclasses.asdict(self), "hit_ratio": self.hit_ratio}


class CacheClient(Protocol):
    """The operations the fsspec filesystem, the loaders and the CLI need."""

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

    def cancel(self, job_id: str) -> JobStatus:
        """Stop a prefetch job: nothing new is fetched, the pins it added are released,
        what it fetched stays cached; its status once it stopped."""

    def cached(self, source: str | None = None) -> list[CachedEntry]:
        """Cached objects (every version), sorted by URL; only those ``source`` names."""

    def evict(self, sources: Sequence[str]) -> EvictResult:
        """Evict what ``sources`` name (pinned objects are refused)."""

    def unpin(self, holder: str, sources: Sequence[str] = ()) -> int:
        """Release ``holder``'s pins (all, and its view, when no source is named)."""

    def view(
        self,
        holder: str,
        sources: Sequence[str],
        tier: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> ViewInfo:
        """Pin and complete ``sources`` for ``holder``; its view of them. With
        ``model`` (``namespace/name`` of a CachedModel) the view is exactly that
        model's ``version`` as this node filled it, and ``sources`` its one source."""

    def model(self, namespace: str, name: str) -> ModelInfo:
        """A CachedModel as this node holds it (FileNotFoundError: no such model)."""

    def status(self) -> NodeStatus: ...

    @property
    def block_size(self) -> int: ...
