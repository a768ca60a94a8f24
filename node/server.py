"""The node's gRPC service (``cachefs.v1.Cache``): the engine, jobs and views as calls.

Every call runs under ``_Call``: it takes the request id, counts the call by method
and status, logs one JSON line, and turns an exception into the status of the one
table in ``cachefs.rpc_errors`` (the class name travels in trailing metadata, so a
Python client raises the same exception again). Read streams chunks of 1-4 MiB read
from the store; a client that goes away, or whose deadline passes, stops the stream.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from cachefs.node import logs
from cachefs.node.engine import Engine, Manifest
from cachefs.node.faults import corrupt_peer_blocks
from cachefs.node.jobs import JobRegistry
from cachefs.node.metrics import CallStats
from cachefs.node.origins import ObjectRef
from cachefs.node.views import Views

from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import cachefs_pb2_grpc as pb_grpc
from cachefs.rpc_errors import abort, kind_of, status_of
from cachefs.urls import parse_url, redact

if TYPE_CHECKING:
    from cachefs.node.cluster.peers import Peers

log = logging.getLogger("cachefs.server")

DEFAULT_CHUNK = 1024 * 1024
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024
# Calls logged at debug level: readers make many of them.
_FREQUENT = {"Stat", "List", "Read", "Status", "WatchJob", "FetchBlock"}
_STATES = {
    "running": pb.JobStatus.RUNNING,
    "succeeded": pb.JobStatus.SUCCEEDED,
    "failed": pb.JobStatus.FAILED,
    "cancelled": pb.JobStatus.CANCELLED,
}


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a servicer method under a ``_Call`` (unary and server-streaming alike)."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: CacheServicer, request: Any, context: grpc.ServicerContext) -> Any:
            call = self._begin(name, context)
            try:
                yield from method(self, request, context, call)
            except Exception as exc:
                call.fail(exc, context)
            finally:
                call.end(context)

        return streaming

    @functools.wraps(method)
    def unary(self: CacheServicer, request: Any, context: grpc.ServicerContext) -> Any:
        call = self._begin(name, context)
        try:
            return method(self, request, context, call)
        except Exception as exc:
            call.fail(exc, context)
        finally:
            call.end(context)

    return unary


class _Call:
    """One call's bookkeeping: request id, outcome, one log line."""

    def __init__(self, method: str, calls: CallStats, context: grpc.ServicerContext) -> None:
        self.method = method
        self.calls = calls
        metadata = dict(context.invocation_metadata() or ())
        supplied = metadata.get(logs.REQUEST_ID_KEY)
        self.request_id = str(supplied)[:64] if supplied else uuid.uuid4().hex[:16]
        self.token = logs.request_id.set(self.request_id)
        self.started = time.monotonic()
        self.code = "OK"
        self.error_kind: str | None = None
        self.sent = 0

    def fail(self, exc: BaseException, context: grpc.ServicerContext) -> None:
        self.code = status_of(exc).name
        self.error_kind = kind_of(exc)
        level = logging.ERROR if self.error_kind == "InternalError" else logging.INFO
        log.log(
            level,
            "%s failed: %s",
            self.method,
            exc,
            exc_info=level == logging.ERROR,
            extra={"method": self.method, "code": self.code},
        )
        abort(context, exc)

    def end(self, context: grpc.ServicerContext) -> None:
        if self.code == "OK" and not context.is_active():
            self.code = "CANCELLED"  # the client left or its deadline passed
        self.calls.record(self.method, self.code, self.error_kind)
        log.log(
            logging.DEBUG if self.method in _FREQUENT else logging.INFO,
            "%s %s",
            self.method,
            self.code,
            extra={
                "method": self.method,
                "code": self.code,
                "ms": round((time.monotonic() - self.started) * 1000, 3),
                "bytes": self.sent,
            },
        )
        logs.request_id.reset(self.token)


class CacheServicer(pb_grpc.CacheServicer):
    def __init__(self, engine: Engine, node_id: str, peers: Peers | None = None) -> None:
        self.engine = engine
        self.node_id = node_id
        self.peers = peers
        self.jobs = JobRegistry(engine, peers)
        self.views = Views(engine)
        self.calls = CallStats()
        self.started = time.monotonic()

    def _begin(self, method: str, context: grpc.ServicerContext) -> _Call:
        return _Call(method, self.calls, context)

    # -- objects -----------------------------------------------------------------

    @_rpc
    def Stat(
        self, request: pb.StatRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.ObjectInfo:
        try:
            ref = self.engine.stat(request.url)
        except IsADirectoryError:
            return pb.ObjectInfo(url=parse_url(request.url).canonical, is_directory=True)
        info = pb.ObjectInfo(
            url=ref.canonical,
            version=ref.version,
            size=ref.size,
            id=ref.id,
            block_size=self.engine.header(ref).block_size,
        )
        obj = self.engine.store.get(ref.id)
        if obj is not None and obj.complete:
            path = self.engine.store.local_path(obj)  # verified before it is handed out
            if path is not None:
                info.complete = True
                info.local_path = str(path)
                info.inode = obj.inode
        return info

    @_rpc
    def List(
        self, request: pb.ListRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.ListResponse:
        if request.cached:
            objects = self.engine.matching(request.url) if request.url else self.engine.cached()
            return pb.ListResponse(
                entries=[
                    pb.Entry(
                        name=o.header.url,
                        size=o.header.size,
                        type="file",
                        version=o.header.version,
                        cached_bytes=o.cached_bytes,
                        tier=o.tier.name,
                        complete=o.complete,
                        pinned_by=self.engine.store.holders(o.id),
                        id=o.id,
                    )
                    for o in sorted(objects, key=lambda o: o.header.url)
                ]
            )
        url = parse_url(request.url)
        entries = []
        for entry in self.engine.origin.ls(url):
            name = entry["name"]
            entries.append(
                pb.Entry(
                    name=name if "://" in name else url.child(name).canonical,
                    size=int(entry.get("size") or 0),
                    type=str(entry.get("type", "file")),
                    version=str(entry.get("version", "")),
                )
            )
        return pb.ListResponse(entries=entries)

    @_rpc
    def Read(
        self, request: pb.ReadRequest, context: grpc.ServicerContext, call: _Call
    ) -> Iterator[pb.ReadChunk]:
        chunk = request.chunk_size or DEFAULT_CHUNK
        if not MIN_CHUNK <= chunk <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be between 64 KiB and 4 MiB, not {chunk}")
        ref = self.engine.pinned(request.url, request.version)
        if request.version and request.size != ref.size:
            raise ValueError(
                f"{ref.canonical} version {ref.version} has {ref.size} bytes, not {request.size}"
            )
        start = request.offset
        end = ref.size if request.length == 0 else min(ref.size, start + request.length)
        if start > ref.size:
            raise ValueError(
                f"offset {start} is past the end of {ref.canonical} ({ref.size} bytes)"
            )
        for position in range(start, end, chunk):
            if not context.is_active():
                return
            data = self.engine.read_ref(ref, position, min(position + chunk, end))
            call.sent += len(data)
            yield pb.ReadChunk(data=data)

    # -- prefetch, pins, views ---------------------------------------------------

    @_rpc
    def Prefetch(
        self, request: pb.PrefetchRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.JobStatus:
        sources = _sources(request.sources)
        if request.tier:
            self.engine.store.tier(request.tier)
        manifest = None
        if request.objects:  # a manifest another node resolved: exactly these versions
            refs = tuple(
                ObjectRef(parse_url(o.url), o.version, o.size, o.etag or None)
                for o in request.objects
            )
            manifest = Manifest(tuple(sources), refs)
        job = self.jobs.start(
            sources,
            request.pin_holder or None,
            request.tier or None,
            manifest=manifest,
            cluster=request.cluster,
        )
        log.info(
            "job %s started: %s",
            job.id,
            ", ".join(redact(s) for s in sources),
            extra={"job": job.id, "pin_holder": request.pin_holder or None},
        )
        return _job_message(job.status)

    @_rpc
    def WatchJob(
        self, request: pb.JobRef, context: grpc.ServicerContext, call: _Call
    ) -> Iterator[pb.JobStatus]:
        job = self.jobs.get(request.id)
        for status in job.watch(context.is_active):
            yield _job_message(status)

    @_rpc
    def Unpin(
        self, request: pb.UnpinRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.UnpinResponse:
        if not request.holder:
            raise ValueError("name the pin's holder")
        if request.sources:
            count = sum(self.engine.unpin(request.holder, s) for s in _sources(request.sources))
        else:
            self.views.remove(request.holder)
            count = self.engine.unpin(request.holder)
        return pb.UnpinResponse(objects=count)

    @_rpc
    def View(
        self, request: pb.ViewRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.ViewResponse:
        if not request.holder:
            raise ValueError("name the view's holder")
        view = self.views.build(request.holder, _sources(request.sources), request.tier or None)
        return pb.ViewResponse(path=str(view.path), objects=view.objects, bytes=view.bytes)

    @_rpc
    def Evict(
        self, request: pb.EvictRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.EvictResponse:
        evicted = [obj for source in _sources(request.sources) for obj in self.engine.evict(source)]
        return pb.EvictResponse(objects=len(evicted), bytes=sum(o.charged for o in evicted))

    @_rpc
    def FetchBlock(
        self, request: pb.FetchBlockRequest, context: grpc.ServicerContext, call: _Call
    ) -> Iterator[pb.BlockChunk]:
        if not request.block_size:
            raise ValueError("name the block size the asking node uses")
        ref = ObjectRef(parse_url(request.url), request.version, request.size, request.etag or None)
        block = self.engine.block_for_peer(
            ref,
            request.block_size,
            request.index,
            fill=not request.cached_only,
            forwarded=request.forwarded,
        )
        if block is None:
            raise FileNotFoundError(f"block {request.index} of {ref.canonical} is not cached here")
        data, checksum = block
        if corrupt_peer_blocks() and data:  # test-only fault: a peer that lies
            data = bytearray(data)  # a copy: the block may be shared with local readers
            data[0] ^= 0xFF
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), DEFAULT_CHUNK):
            piece = view[offset : offset + DEFAULT_CHUNK]
            call.sent += len(piece)
            if offset == 0:
                yield pb.BlockChunk(checksum=checksum, length=len(data), data=bytes(piece))
            else:
                yield pb.BlockChunk(data=bytes(piece))

    @_rpc
    def Status(
        self, request: pb.StatusRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.StatusResponse:
        stats = self.engine.stats.snapshot()
        return pb.StatusResponse(
            node_id=self.node_id,
            tiers=[
                pb.TierStatus(
                    name=t.name,
                    medium=t.medium,
                    path=t.path,
                    quota=t.quota,
                    used=t.used,
                    pinned=t.pinned,
                    objects=t.objects,
                    evictions=t.evictions,
                )
                for t in self.engine.store.usage()
            ],
            pins={h: len(ids) for h, ids in self.engine.store.pins().items()},
            jobs=[_job_message(s) for s in self.jobs.jobs()],
            served_bytes=stats["served_bytes"],
            hits=stats["hits"],
            misses=stats["misses"],
            fetched_bytes=stats["fetched_bytes"],
            rpcs=self.calls.by_method(),
            uptime_seconds=time.monotonic() - self.started,
            members=self.peers.membership.members() if self.peers else (),
        )


def _sources(sources: Any) -> list[str]:
    if not sources:
        raise ValueError("name at least one source (a URL, or a prefix ending in /)")
    for source in sources:
        parse_url(source)  # a bad URL fails now, not in a job
    return list(sources)


def _job_message(status: Any) -> pb.JobStatus:
    return pb.JobStatus(
        id=status.id,
        state=_STATES[status.state],
        sources=status.sources,
        pin_holder=status.pin_holder or "",
        bytes_total=status.bytes_total,
        bytes_done=status.bytes_done,
        objects_total=status.objects_total,
        objects_done=status.objects_done,
        fetched_bytes=status.fetched_bytes,
        peer_bytes=status.peer_bytes,
        cached_before=status.cached_before,
        evicted_during=status.evicted_during,
        seconds=status.seconds,
        error=status.error or "",
        error_kind=status.error_kind or "",
        nodes_total=status.nodes_total,
        nodes_done=status.nodes_done,
    )


def node_id_default() -> str:
    return os.uname().nodename
