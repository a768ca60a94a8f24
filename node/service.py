"""The node's operations, each written once; the gRPC servicer and embedded mode adapt it.

Every call a client can make (stat, list, cached objects, evict, unpin, views,
prefetch and its jobs, status, and the peers' calls) is a method here that takes the
caller and plain values, checks the caller against the policy (``policy.py``) and the
values against what the node knows, and returns the contract's types
(``cachefs.types``). The servicer
(``server.py``) turns messages into these calls and results into messages; the
``EmbeddedClient`` (``embedded.py``) calls them in the process. So a node and
embedded mode do the same thing; tests/test_modes.py holds them to it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from cachefs.errors import QuotaExceededError, VersionChangedError
from cachefs.node.callers import Caller
from cachefs.node.engine import Engine, Manifest, PeerBlock
from cachefs.node.jobs import Job, JobRegistry
from cachefs.node.models.names import check_name
from cachefs.node.origins import ObjectRef
from cachefs.node.store import CachedObject
from cachefs.node.views import Views
from cachefs.types import (
    CachedEntry,
    EvictResult,
    JobStatus,
    ModelInfo,
    NodeStatus,
    ObjectInfo,
    ViewInfo,
)
from cachefs.urls import HTTP_PROTOCOLS, canonical_source, parse_url

log = logging.getLogger("cachefs.node")

if TYPE_CHECKING:
    from cachefs.node.cluster.peers import Peers


class ModelRegistry(Protocol):
    """The CachedModels a node reconciles (``node/models``): what a volume may name."""

    def model(self, namespace: str, name: str) -> ModelInfo:
        """The model as this node holds it; FileNotFoundError if there is none."""

    def manifest(self, namespace: str, name: str, version: str) -> tuple[Manifest, str | None]:
        """The manifest of ``version`` as this node filled it, and the model's tier;
        VersionChangedError when that is not the version a new volume gets now."""


class CacheService:
    """One engine's operations, with its prefetch jobs and views."""

    def __init__(self, engine: Engine, node_id: str = "", peers: Peers | None = None) -> None:
        """``node_id`` names the node in ``status``; ``peers``: its cluster, if any."""
        self.engine = engine
        self.policy = engine.config.policy
        self.node_id = node_id
        self.block_port = 0  # set by the node once its peer block endpoint listens
        self.peers = peers
        self.jobs = JobRegistry()
        self.views = Views(engine)
        self.models: ModelRegistry | None = None  # a node that reconciles CachedModels
        self.started = time.monotonic()

    # -- objects -----------------------------------------------------------------

    def stat(self, caller: Caller, url: str, data_file: bool = False) -> ObjectInfo:
        """The object's current version (IsADirectoryError for a prefix). With
        ``data_file``, a complete object's verified file and inode are looked up too,
        and ``complete`` says whether that file can be handed out."""
        self.policy.require(caller, "read", url)
        ref = self.engine.stat(url)
        obj = self.engine.store.get(ref.id)
        info = ObjectInfo(
            url=ref.canonical,
            version=ref.version,
            size=ref.size,
            id=ref.id,
            complete=bool(obj and obj.complete),
            handle=ref,
        )
        if data_file and info.complete:
            found = self.data_file(info.id)
            info = dataclasses.replace(
                info,
                complete=found is not None,
                local_path=found[0] if found else None,
                inode=found[1] if found else 0,
            )
        return info

    def data_file(self, object_id: str) -> tuple[str, int] | None:
        """(path, inode) of a complete object's data file, verified; else None."""
        obj = self.engine.store.get(object_id)
        if obj is None or not obj.complete:
            return None
        path = self.engine.store.local_path(obj)  # verified before it is handed out
        return (str(path), obj.inode) if path is not None else None

    def pinned(self, caller: Caller, url: str, version: str, size: int) -> ObjectRef:
        """``url`` at the ``version`` (and ``size``) a reader pinned; "" is the current."""
        self.policy.require(caller, "read", url)
        ref = self.engine.pinned(url, version)
        if version and size != ref.size:
            raise ValueError(
                f"{ref.canonical} version {ref.version} has {ref.size} bytes, not {size}"
            )
        return ref

    def ls(self, caller: Caller, url: str) -> list[dict[str, Any]]:
        """The origin's listing under ``url``: name (a full URL), size, type, version."""
        self.policy.require(caller, "read", url)
        parsed = parse_url(url)
        entries = []
        for entry in self.engine.origin.ls(parsed):
            name = str(entry["name"])
            listed = {
                "name": name if "://" in name else parsed.child(name).canonical,
                "size": int(entry.get("size") or 0),
                "type": str(entry.get("type", "file")),
            }
            if entry.get("version"):
                listed["version"] = str(entry["version"])
            entries.append(listed)
        return entries

    # -- what is cached ----------------------------------------------------------

    def cached(self, caller: Caller, source: str | None = None) -> list[CachedEntry]:
        """Cached objects, every version, by URL; only those ``source`` names, and only
        those the caller may read."""
        if source:
            self.policy.require(caller, "read", source)
        objects = [
            o
            for o in (self._matching(source) if source else self.engine.store.objects())
            if self.policy.allows(caller, "read", o.header.url)
        ]
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
                verified=o.verification,
                superseded=o.superseded,
            )
            for o in sorted(objects, key=lambda o: (o.header.url, o.superseded))
        ]

    def evict(self, caller: Caller, sources: Sequence[str]) -> EvictResult:
        """Evict the cached objects (any version) each source names; pinned ones refuse.
        Nothing cached is nothing to do (evicting twice succeeds twice)."""
        for source in _checked(sources):
            self.policy.require(caller, "manage", source)
        evicted = [obj for source in sources for obj in self._evict(source)]
        return EvictResult(len(evicted), sum(obj.charged for obj in evicted))

    def _evict(self, source: str) -> list[CachedObject]:
        store = self.engine.store
        targets = self._matching(source)
        pinned = [o for o in targets if store.holders(o.id)]
        if pinned:
            holders = sorted({h for o in pinned for h in store.holders(o.id)})
            raise QuotaExceededError(
                f"{len(pinned)} of the {len(targets)} objects are pinned (by "
                f"{', '.join(holders)}); unpin them first (cachefs unpin --holder NAME SOURCE)"
            )
        for obj in targets:
            store.evict(obj)
        return targets

    def unpin(self, caller: Caller, holder: str, sources: Sequence[str] = ()) -> int:
        """Release ``holder``'s pins of ``sources``; with none, all of them and its view.
        A caller that does not manage names its own holders (``Policy.holder``). Pins
        released already are nothing to do (the count says 0)."""
        holder = self.policy.holder(caller, holder)
        if sources:
            return sum(self._unpin(holder, source) for source in _checked(sources))
        self.views.remove(holder)
        return self._unpin(holder, None)

    def _unpin(self, holder: str, source: str | None) -> int:
        ids = set(self.engine.store.pins().get(holder, ()))
        if source is not None:
            ids &= {o.id for o in self._matching(source)}
        self.engine.store.unpin(holder, ids)
        return len(ids)

    def _matching(self, source: str) -> list[CachedObject]:
        """Cached objects ``source`` names: that URL (any version), or all under a prefix."""
        url = parse_url(source)
        prefix = url.canonical if source.endswith("/") else None
        return [
            o
            for o in self.engine.store.objects()
            if o.header.url == url.canonical or (prefix and o.header.url.startswith(prefix))
        ]

    # -- views -------------------------------------------------------------------

    def view(
        self,
        caller: Caller,
        holder: str,
        sources: Sequence[str],
        tier: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> ViewInfo:
        """Pin and complete ``sources`` for ``holder``; its view (built once). With
        ``model`` (``namespace/name``), exactly that CachedModel's ``version`` as this
        node filled it: ``sources`` must be its one source (what the caller checked)."""
        if not holder:
            raise ValueError("name the view's holder")
        holder = self.policy.holder(caller, holder)
        if model:
            return self._model_view(caller, holder, sources, tier, model, version or "")
        for source in _checked(sources):
            self.policy.require(caller, "view", source)
        view = self.views.build(holder, list(sources), tier)
        return ViewInfo(str(view.path), view.objects, view.bytes)

    def _model_view(
        self,
        caller: Caller,
        holder: str,
        sources: Sequence[str],
        tier: str | None,
        model: str,
        version: str,
    ) -> ViewInfo:
        namespace, _, name = model.partition("/")
        namespace, name = check_name(namespace, name)
        if not version:
            raise ValueError(f"name the version of CachedModel {model} to view")
        if tier:
            raise ValueError(
                f"CachedModel {model} lies in the tier its spec.tier names: name no tier"
            )
        manifest, model_tier = self._registry().manifest(namespace, name, version)
        if [canonical_source(s) for s in _checked(sources)] != list(manifest.sources):
            raise ValueError(
                f"version {version} of CachedModel {model} is of {', '.join(manifest.sources)}"
                f", not {', '.join(sources)}: name the source the model's info gives"
            )
        self.policy.require(caller, "view", manifest.sources[0])
        view = self.views.build(holder, manifest.sources, model_tier, manifest=manifest)
        return ViewInfo(str(view.path), view.objects, view.bytes)

    # -- models ------------------------------------------------------------------

    def model(self, caller: Caller, namespace: str, name: str) -> ModelInfo:
        """The CachedModel ``namespace/name`` as this node holds it (a caller sees the
        models whose source it may read)."""
        namespace, name = check_name(namespace, name)
        info = self._registry().model(namespace, name)
        self.policy.require(caller, "read", info.source)
        return info

    def _registry(self) -> ModelRegistry:
        if self.models is None:
            raise ValueError(
                "this cache does not reconcile CachedModels (a cachefs node with "
                "models.enabled and a Kubernetes API does): name the model's source instead"
            )
        return self.models

    # -- prefetch ----------------------------------------------------------------

    def prefetch(
        self,
        caller: Caller,
        sources: Sequence[str],
        pin: str | None = None,
        tier: str | None = None,
        progress: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Fetch every object of ``sources`` in this thread (embedded mode), as a job
        that ``status`` lists; progress reports, then the final status."""
        sources, pin = self._checked_prefetch(caller, sources, pin, tier, None, cluster=False)
        return self.jobs.run(
            sources,
            pin,
            lambda job_id, report, cancelled: self._prefetch(
                job_id, report, cancelled, sources, pin, tier
            ),
            progress or _ignore,
        )

    def start_job(
        self,
        caller: Caller,
        sources: Sequence[str],
        pin: str | None = None,
        tier: str | None = None,
        *,
        manifest: Manifest | None = None,
        cluster: bool = False,
    ) -> JobStatus:
        """Run the prefetch of ``sources`` (or of exactly ``manifest``: a peer's), here
        or with ``cluster`` onto every member, as a job in the node; its first status.
        Bad input fails now, not in the job."""
        sources, pin = self._checked_prefetch(caller, sources, pin, tier, manifest, cluster)
        if manifest is not None:
            manifest = self._trusted(manifest)

        def work(
            job_id: str, report: Callable[[JobStatus], None], cancelled: threading.Event
        ) -> JobStatus:
            return self._prefetch(job_id, report, cancelled, sources, pin, tier, manifest, cluster)

        return self.jobs.start(sources, pin, work, owner=caller.principal).status

    def _checked_prefetch(
        self,
        caller: Caller,
        sources: Sequence[str],
        pin: str | None,
        tier: str | None,
        manifest: Manifest | None,
        cluster: bool,
    ) -> tuple[list[str], str | None]:
        """The sources and the pin's holder name, once the caller may prefetch them."""
        checked = _checked(sources)
        if manifest is not None:  # versions another node resolved: only peers state them
            self.policy.require_everywhere(caller, "peer")
        for source in checked:
            self.policy.require(caller, "manage" if cluster else "prefetch", source)
        if tier is not None:
            self.engine.store.tier(tier)  # a wrong name fails before anything is fetched
        if cluster:
            self._cluster()
        return checked, self.policy.holder(caller, pin) if pin else None

    def _trusted(self, manifest: Manifest) -> Manifest:
        """A manifest a peer states, checked before any byte moves.

        Each entry must be its origin's current version and size as this node sees it
        (one stat: it also fills the stat cache the fills use; the origin is asked
        again when a cached stat disagrees). S3 and HTTP entries
        must carry an ETag that is their version, so every fill is a GET with
        ``If-Match`` on it: bytes of another version are never stored under this one.
        """
        checked = []
        for ref in manifest.objects:
            if ref.url.protocol in ("s3", *HTTP_PROTOCOLS) and (
                not ref.etag or ref.version != f"etag:{ref.etag}"
            ):
                raise ValueError(
                    f"{ref.canonical}: a manifest entry needs an ETag that is its version; "
                    "resolve the source on this node instead"
                )
            current = self.engine.stat(ref.url.fetch_url)
            if (current.version, current.size) != (ref.version, ref.size):
                # This node's stat may be older than the manifest (a new version that
                # another node resolved): ask the origin itself before refusing.
                current = self.engine.stat(ref.url.fetch_url, fresh=True)
            if (current.version, current.size) != (ref.version, ref.size):
                raise VersionChangedError(
                    ref.canonical,
                    ref.version,
                    f"the origin has version {current.version} of {current.size} bytes, the "
                    f"manifest says {ref.size}",
                )
            checked.append(current)
        return Manifest(manifest.sources, tuple(checked))

    def _prefetch(
        self,
        job_id: str,
        report: Callable[[JobStatus], None],
        cancelled: threading.Event,
        sources: list[str],
        pin: str | None,
        tier: str | None,
        manifest: Manifest | None = None,
        cluster: bool = False,
    ) -> JobStatus:
        """The body of every prefetch job: this node's share, or the whole cluster's."""
        manifest = manifest or self.engine.resolve(sources)
        if cluster:
            from cachefs.node.cluster.prefetch import run_cluster_prefetch

            return run_cluster_prefetch(
                self._cluster(),
                manifest,
                pin,
                tier,
                report,
                job_id,
                cancelled,
                run_here=lambda note: self._prefetch(
                    job_id, note, cancelled, sources, pin, tier, manifest
                ),
            )
        result = self.engine.prefetch_manifest(
            manifest,
            pin=pin,
            tier=tier,
            progress=lambda state: report(state.status(job_id, sources, pin)),
            cancelled=cancelled,
        )
        return result.status(job_id)

    def job(self, caller: Caller, job_id: str) -> Job:
        """A job of this node whose sources the caller may read (FileNotFoundError for
        any other: an unknown job and another's look the same)."""
        job = self.jobs.get(job_id)
        if not self._may_see(caller, job.status):
            raise FileNotFoundError(f"no job {job_id!r} on this node")
        return job

    def cancel(self, caller: Caller, job_id: str) -> JobStatus:
        """Stop a job: who started it may, and whoever may manage all its sources.
        Its status once it has stopped; cancelling a finished job changes nothing."""
        job = self.job(caller, job_id)
        if caller.principal != job.owner and not all(
            self.policy.allows(caller, "manage", canonical_source(s)) for s in job.status.sources
        ):
            raise PermissionError(
                f"refused {caller}: job {job_id} was started by {job.owner}; only it, or a "
                "caller allowed to manage the job's sources, may cancel it"
            )
        if job.status.finished:
            return job.status
        status = self.jobs.cancel(job)
        log.info("job %s cancelled by %s", job_id, caller.principal)
        return status

    def _may_see(self, caller: Caller, status: JobStatus) -> bool:
        return all(self.policy.allows(caller, "read", canonical_source(s)) for s in status.sources)

    # -- peers -------------------------------------------------------------------

    def block_for_peer(
        self,
        caller: Caller,
        ref: ObjectRef,
        block_size: int,
        index: int,
        fill: bool,
        forwarded: bool,
    ) -> AbstractContextManager[PeerBlock | None]:
        """Block ``index`` of ``ref`` for another node, held while it is sent: only
        peers ask, and only in this node's block size (so no caller chooses how much
        it holds)."""
        self.policy.require_everywhere(caller, "peer")
        if block_size != self.engine.config.block_size:
            raise ValueError(
                f"blocks of {block_size} bytes are not this node's "
                f"({self.engine.config.block_size}): give every node the same block_size"
            )
        return self.engine.block_for_peer(ref, block_size, index, fill, forwarded)

    def _cluster(self) -> Peers:
        if self.peers is None:
            raise ValueError(
                "this node has no cluster: configure cluster.membership (or cachefs node "
                "--peers) to prefetch onto every node"
            )
        return self.peers

    # -- status ------------------------------------------------------------------

    def status(self, caller: Caller) -> NodeStatus:
        """Tiers, pins, jobs and counters; of the pins and jobs, those the caller may
        see (its own holders, jobs of sources it may read)."""
        stats = self.engine.stats.snapshot()
        return NodeStatus(
            node_id=self.node_id,
            tiers=tuple(self.engine.store.usage()),
            pins={
                holder: len(ids)
                for holder, ids in self.engine.store.pins().items()
                if self.policy.owns(caller, holder)
            },
            jobs=tuple(s for s in self.jobs.jobs() if self._may_see(caller, s)),
            served_bytes=stats["served_bytes"],
            hits=stats["hits"],
            misses=stats["misses"],
            fetched_bytes=stats["fetched_bytes"],
            uptime_seconds=time.monotonic() - self.started,
            members=tuple(self.peers.membership.members()) if self.peers else (),
            block_port=self.block_port,
        )


def _checked(sources: Sequence[str]) -> list[str]:
    """``sources`` as a list, each a valid URL: a bad one fails before any work starts."""
    if not sources:
        raise ValueError("name at least one source (a URL, or a prefix ending in /)")
    for source in sources:
        parse_url(source)
    return list(sources)


def _ignore(status: JobStatus) -> None:
    """A progress report nobody asked for."""
