"""The node's gRPC service (``cachefs.v1.Cache``): the service layer as calls.

Each method turns its request into a call of ``CacheService`` (``service.py``, where
the operations live) and the result into a message (``cachefs.messages``). Every
call runs under ``_Call``: it takes the request id, counts the call by method and
status, logs one JSON line, and turns an exception into the status of the one table
in ``cachefs.rpc_errors`` (the class name travels in trailing metadata, so a Python
client raises the same exception again). Read streams chunks of 1-4 MiB read from
the store; a client that goes away, or whose deadline passes, stops the stream.
Peers fetch blocks from the block endpoint (``cluster/block_server.py``), not here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cachefs import messages, ranges
from cachefs.node import logs
from cachefs.node.auth import Authenticator, Unauthenticated
from cachefs.node.callers import Caller
from cachefs.node.engine import Manifest
from cachefs.node.metrics import CallStats
from cachefs.node.origins import ObjectRef
from cachefs.node.service import CacheService
from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import cachefs_pb2_grpc as pb_grpc
from cachefs.rpc_errors import abort, kind_of, status_of
from cachefs.urls import parse_url, redact

log = logging.getLogger("cachefs.server")

DEFAULT_CHUNK = 1024 * 1024
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024
LIST_BATCH = 1000  # entries per List message: about 150 KB, far below the 4 MiB limit
# Calls logged at debug level: readers make many of them.
_FREQUENT = {"Stat", "List", "Read", "Status", "WatchJob", "FetchBlock", "Model"}


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
    """One call's bookkeeping: request id, caller, outcome, one log line."""

    def __init__(
        self, method: str, calls: CallStats, context: grpc.ServicerContext, caller: Caller
    ) -> None:
        self.method = method
        self.calls = calls
        self.caller = caller
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
    """The service on one listener, whose ``Authenticator`` says who each caller is."""

    def __init__(
        self, service: CacheService, authenticator: Authenticator, calls: CallStats
    ) -> None:
        self.service = service
        self.engine = service.engine
        self.authenticator = authenticator
        self.calls = calls  # shared by the listeners

    def _begin(self, method: str, context: grpc.ServicerContext) -> _Call:
        try:
            caller = self.authenticator.caller(context)
        except Unauthenticated as exc:
            self.calls.record(method, "UNAUTHENTICATED", None)
            log.info("%s refused: %s", method, exc, extra={"method": method})
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise AssertionError("unreachable: context.abort raises") from None
        return _Call(method, self.calls, context, caller)

    # -- objects -----------------------------------------------------------------

    @_rpc
    def Stat(
        self, request: pb.StatRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.ObjectInfo:
        try:
            info = self.service.stat(call.caller, request.url, data_file=True)
        except IsADirectoryError:
            return pb.ObjectInfo(url=parse_url(request.url).canonical, is_directory=True)
        return messages.object_message(info, self.engine.header(info.handle).block_size)

    @_rpc
    def List(
        self, request: pb.ListRequest, context: grpc.ServicerContext, call: _Call
    ) -> Iterator[pb.ListResponse]:
        if request.cached:
            cached = self.service.cached(call.caller, request.url or None)
            entries = [messages.cached_entry_message(e) for e in cached]
        else:
            entries = [pb.Entry(**e) for e in self.service.ls(call.caller, request.url)]
        for start in range(0, len(entries), LIST_BATCH):
            if not context.is_active():
                return
            yield pb.ListResponse(entries=entries[start : start + LIST_BATCH])

    @_rpc
    def Read(
        self, request: pb.ReadRequest, context: grpc.ServicerContext, call: _Call
    ) -> Iterator[pb.ReadChunk]:
        chunk = request.chunk_size or DEFAULT_CHUNK
        if not MIN_CHUNK <= chunk <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be between 64 KiB and 4 MiB, not {chunk}")
        ref = self.service.pinned(call.caller, request.url, request.version, request.size)
        start, end = ranges.clipped(
            ref.canonical,
            ref.size,
            request.offset,
            request.offset + request.length if request.length else None,  # 0: to the end
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
        manifest = None
        if request.objects:  # a manifest another node resolved: exactly these versions
            refs = tuple(
                ObjectRef(parse_url(o.url), o.version, o.size, o.etag or None)
                for o in request.objects
            )
            manifest = Manifest(tuple(request.sources), refs)
        status = self.service.start_job(
            call.caller,
            request.sources,
            request.pin_holder or None,
            request.tier or None,
            manifest=manifest,
            cluster=request.cluster,
        )
        log.info(
            "job %s started: %s",
            status.id,
            ", ".join(redact(s) for s in request.sources),
            extra={"job": status.id, "pin_holder": request.pin_holder or None},
        )
        return messages.job_message(status)

    @_rpc
    def Cancel(
        self, request: pb.JobRef, context: grpc.ServicerContext, call: _Call
    ) -> pb.JobStatus:
        return messages.job_message(self.service.cancel(call.caller, request.id))

    @_rpc
    def WatchJob(
        self, request: pb.JobRef, context: grpc.ServicerContext, call: _Call
    ) -> Iterator[pb.JobStatus]:
        for status in self.service.job(call.caller, request.id).watch(context.is_active):
            yield messages.job_message(status)

    @_rpc
    def Unpin(
        self, request: pb.UnpinRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.UnpinResponse:
        count = self.service.unpin(call.caller, request.holder, request.sources)
        return pb.UnpinResponse(objects=count)

    @_rpc
    def View(
        self, request: pb.ViewRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.ViewResponse:
        view = self.service.view(
            call.caller,
            request.holder,
            request.sources,
            request.tier or None,
            request.model or None,
            request.version or None,
        )
        return pb.ViewResponse(path=view.path, objects=view.objects, bytes=view.bytes)

    @_rpc
    def Model(
        self, request: pb.ModelRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.ModelInfo:
        return messages.model_message(
            self.service.model(call.caller, request.namespace, request.name)
        )

    @_rpc
    def Evict(
        self, request: pb.EvictRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.EvictResponse:
        evicted = self.service.evict(call.caller, request.sources)
        return pb.EvictResponse(objects=evicted.objects, bytes=evicted.bytes)

    @_rpc
    def Status(
        self, request: pb.StatusRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.StatusResponse:
        status = self.service.status(call.caller)
        return messages.status_message(dataclasses.replace(status, rpcs=self.calls.by_method()))


def node_id_default() -> str:
    return os.uname().nodename
