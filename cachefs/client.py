"""Client mode: a ``CacheClient`` that asks a cachefs node over gRPC.

The endpoint is ``unix:///path/to.sock`` (a node on this host) or ``host:port``
(TCP: the shared token from ``CACHEFS_TOKEN``/``CACHEFS_TOKEN_FILE`` is presented,
and ``CACHEFS_TLS_CA`` turns on TLS). Channels are made lazily, one per process id,
so a forked child (a DataLoader worker) never uses its parent's. Every call has a
deadline. A complete object whose file this host can see is read from the file
directly; other reads stream 1 MiB chunks into preallocated buffers. Origin
credentials are never sent: the node reads origins with its own.

A node restarts (an upgrade, a crash) while its clients run. A client that has
reached its node waits for it to come back, up to ``reconnect_grace`` seconds
(``CACHEFS_RECONNECT_GRACE``, default 60; 0 turns this off), retrying with backoff
and jitter: a ``Read`` stream goes on from the exact byte it had reached, at the same
pinned version (a node that cannot serve that version any more answers
``VersionChangedError``, never bytes of another), and idempotent calls are asked
again. An endpoint never reached fails at once, so a wrong one shows immediately.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from cachefs import messages, ranges
from cachefs.auth import (
    POD_TOKEN_FILE_ENV,
    check_token,
    metadata,
    read_pod_token,
    read_token,
)
from cachefs.errors import IntegrityError, NodeUnavailableError
from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import cachefs_pb2_grpc as pb_grpc
from cachefs.rpc_errors import ERROR_KEY, from_rpc_error, rebuild
from cachefs.types import (
    CachedEntry,
    EvictResult,
    JobStatus,
    ModelInfo,
    NodeStatus,
    ObjectInfo,
    ViewInfo,
)

log = logging.getLogger("cachefs.client")

TLS_CA_ENV = "CACHEFS_TLS_CA"
RECONNECT_GRACE_ENV = "CACHEFS_RECONNECT_GRACE"
DEFAULT_TIMEOUT = 60.0
# Long enough for a node's drain (shutdown_grace, 30 s by default) plus its restart.
DEFAULT_RECONNECT_GRACE = 60.0
# Calls that do the same when sent twice, so a call the node may or may not have
# seen before it went away can be sent again; a Prefetch (a new job) cannot.
# (List, a stream, is asked again whole by _listing.)
_IDEMPOTENT = frozenset({"Stat", "Status", "View", "Unpin", "Evict", "Cancel", "Model"})
_RETRY_FIRST_DELAY = 0.1
_RETRY_MAX_DELAY = 1.0
# Streams get longer: the base deadline plus the time to move the bytes at this rate.
_SLOWEST_RATE = 20 * 1024 * 1024
CHUNK_SIZE = 1024 * 1024
_DAY = 24 * 3600.0
_MAX_MESSAGE = 4 * 1024 * 1024 + 64 * 1024
_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_clients: dict[tuple[int, str, float, str | None, str | None, str | None, float], NodeClient] = {}
# How long a pod token read from its file is used before the file is read again
# (kubelet replaces a projected token well before it expires).
_POD_TOKEN_REREAD = 30.0
_clients_lock = threading.Lock()


class _CallsInFlight:
    """Counts this process's calls so that a fork waits until none is in flight.

    gRPC can only hand a forking process a clean state when no thread is inside a
    call (else its fork handlers are skipped and the child's channels break). So
    ``os.fork`` waits, up to ``FORK_WAIT`` seconds, for the calls in flight to end,
    holding new ones back until the fork is done; DataLoader workers fork this way.
    """

    FORK_WAIT = 30.0

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._count = 0
        self._forking = False

    def enter(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not self._forking)
            self._count += 1

    def leave(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def before_fork(self) -> None:
        with self._changed:
            self._forking = True
            self._changed.wait_for(lambda: self._count == 0, self.FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        with self._changed:
            self._forking = False
            self._changed.notify_all()

    def after_fork_in_child(self) -> None:
        self._changed = threading.Condition()  # the parent's threads are not here
        self._count = 0
        self._forking = False


_in_flight = _CallsInFlight()
os.register_at_fork(
    before=_in_flight.before_fork,
    after_in_parent=_in_flight.after_fork_in_parent,
    after_in_child=_in_flight.after_fork_in_child,
)


def parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """(gRPC target, is TCP) of ``unix:///abs/path.sock`` or ``host:port``."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(
                f"endpoint {endpoint!r}: a unix socket needs an absolute path "
                "(unix:///run/cachefs/cachefs.sock)"
            )
        return endpoint, False
    match = _ENDPOINT.match(endpoint)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(
            f"endpoint {endpoint!r} is neither unix:///path/to.sock nor host:port; set "
            "CACHEFS_ENDPOINT (or endpoint=) to the node's socket or address"
        )
    return endpoint, True


def reconnect_grace_from_env() -> float:
    """``CACHEFS_RECONNECT_GRACE`` in seconds, else the default; a bad value says so."""
    raw = os.environ.get(RECONNECT_GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_RECONNECT_GRACE
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not (grace >= 0 and math.isfinite(grace)):
        raise ValueError(
            f"{RECONNECT_GRACE_ENV}={raw!r} is not a number of seconds >= 0: how long a "
            "client waits for a restarting node (0: not at all)"
        )
    return grace


def get_client(endpoint: str, timeout: float | None = None, token: str | None = None) -> NodeClient:
    """The process's client of ``endpoint`` (one per process id and token: fork-safe).
    ``token``: the cluster token to present, else the environment's."""
    _target, tcp = parse_endpoint(endpoint)
    token = check_token(token, "the token option") if token is not None else read_token()
    ca = os.environ.get(TLS_CA_ENV) if tcp else None
    pod_token_file = os.environ.get(POD_TOKEN_FILE_ENV)
    grace = reconnect_grace_from_env()
    key = (os.getpid(), endpoint, timeout or DEFAULT_TIMEOUT, token, ca, pod_token_file, grace)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = NodeClient(
                endpoint, timeout, token, ca, pod_token_file, reconnect_grace=grace
            )
        return client


class NodeClient:
    """A ``CacheClient`` of one node."""

    def __init__(
        self,
        endpoint: str,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        pod_token_file: str | None = None,
        reconnect_grace: float | None = None,
    ) -> None:
        """``token`` (the cluster token) and the pod token in ``pod_token_file`` are
        presented on every call, and ``tls_ca`` (a PEM file) turns TLS on; each
        defaults to its environment variable ("" for none). ``reconnect_grace`` is how
        long calls wait for a node that went away (default ``CACHEFS_RECONNECT_GRACE``,
        else 60 s; 0: fail at once)."""
        self.endpoint = endpoint
        self.target, self.tcp = parse_endpoint(endpoint)
        self.timeout = timeout or DEFAULT_TIMEOUT
        if reconnect_grace is None:
            reconnect_grace = reconnect_grace_from_env()
        if not (reconnect_grace >= 0 and math.isfinite(reconnect_grace)):
            raise ValueError(f"reconnect_grace must be seconds >= 0, not {reconnect_grace!r}")
        self.reconnect_grace = float(reconnect_grace)
        # Only a node this client has reached is waited for: an endpoint that never
        # answered is more likely wrong than restarting, and says so at once.
        self._reached = False
        self._down_since: float | None = None  # when the node was first missed, this outage
        self._token = token if token is not None else read_token()
        self._pod_token_file = (
            pod_token_file if pod_token_file is not None else os.environ.get(POD_TOKEN_FILE_ENV)
        )
        self._pod_token: tuple[float, str | None] = (-_POD_TOKEN_REREAD, None)
        self._tls_ca = tls_ca if tls_ca is not None else os.environ.get(TLS_CA_ENV)
        self._lock = threading.Lock()
        self._pid = -1
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.CacheStub | None = None
        self._block_size = CHUNK_SIZE

    # -- the channel ---------------------------------------------------------------

    @property
    def stub(self) -> pb_grpc.CacheStub:
        """This process's stub; a forked child makes its own channel on first use."""
        if self._pid != os.getpid() or self._stub is None:
            with self._lock:
                if self._pid != os.getpid() or self._stub is None:
                    self._connect()
        return self._stub  # type: ignore[return-value]

    def _connect(self) -> None:
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Connections of this channel only: a forked child must never pick up a
            # connection its parent opened (gRPC shares them process-wide otherwise).
            ("grpc.use_local_subchannel_pool", 1),
            # A node that restarts is back within seconds: retry connecting that fast,
            # so a call waiting out the reconnect grace sees it within a second.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if self.tcp:
            if self._tls_ca:
                try:
                    with open(self._tls_ca, "rb") as f:
                        root_certificates = f.read()
                except OSError as exc:
                    raise ValueError(
                        f"cannot read the CA file that {TLS_CA_ENV} names ({self._tls_ca}): "
                        f"{exc.strerror}"
                    ) from None
                credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(self.target, credentials, options=options)
            else:
                channel = grpc.insecure_channel(self.target, options=options)
        else:
            channel = grpc.insecure_channel(self.target, options=options)
        # The parent's channel is left alone: closing it here would break the parent.
        self._channel = channel
        self._stub = pb_grpc.CacheStub(channel)
        self._pid = os.getpid()

    def close(self) -> None:
        with self._lock:
            if self._channel is not None and self._pid == os.getpid():
                self._channel.close()
            self._channel, self._stub, self._pid = None, None, -1

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The tokens this client presents (the pod token's file is read again now and
        then: kubelet rotates it)."""
        pod_token = None
        if self._pod_token_file:
            read_at, pod_token = self._pod_token
            if time.monotonic() - read_at >= _POD_TOKEN_REREAD:
                pod_token = read_pod_token({POD_TOKEN_FILE_ENV: self._pod_token_file})
                self._pod_token = (time.monotonic(), pod_token)
        return metadata(self._token, pod_token)

    def _call(
        self, method: str, request: Any, timeout: float | None = None, wait_for_ready: bool = False
    ) -> Any:
        """One unary call. ``wait_for_ready``: wait (within the deadline) for a channel
        that is still connecting, rather than fail at once: safe for any call, since
        none is sent before a connection exists."""
        deadline = timeout or self.timeout
        attempt = 0
        while True:
            stub = self.stub
            _in_flight.enter()
            try:
                reply = getattr(stub, method)(
                    request,
                    timeout=deadline,
                    metadata=self._metadata(),
                    wait_for_ready=wait_for_ready,
                )
            except grpc.RpcError as exc:
                if method not in _IDEMPOTENT or not self._may_wait_for(exc):
                    raise from_rpc_error(exc, self.endpoint, deadline) from exc
                error = exc
            else:
                self._answered()
                return reply
            finally:
                _in_flight.leave()  # not while waiting: a fork may go ahead meanwhile
            if attempt == 0:
                log.warning(
                    "the cachefs node at %s went away (%s); asking again (%s) for up to %g s",
                    self.endpoint,
                    _details(error),
                    method,
                    self.reconnect_grace,
                )
            self._wait_to_retry(error, attempt)
            attempt += 1

    def _stream(
        self, method: str, request: Any, timeout: float, resumable: bool = False
    ) -> Iterator[Any]:
        """The call's messages. With ``resumable``, a node that went away while this
        client may wait for it ends the stream with ``_NodeWentAway``: the caller asks
        again for what it still lacks."""
        stub = self.stub
        _in_flight.enter()
        try:
            call = getattr(stub, method)(request, timeout=timeout, metadata=self._metadata())
            try:
                for message in call:
                    self._answered()
                    yield message
            finally:
                call.cancel()  # a consumer that stops early frees the node's side
        except grpc.RpcError as exc:
            if resumable and self._may_wait_for(exc):
                raise _NodeWentAway(exc) from exc
            raise from_rpc_error(exc, self.endpoint, timeout) from exc
        finally:
            _in_flight.leave()

    # -- waiting for a node that went away -----------------------------------------

    def _answered(self) -> None:
        """The node answered: it is reachable, and any outage is over."""
        self._reached = True
        self._down_since = None

    def _may_wait_for(self, error: grpc.RpcError) -> bool:
        """Whether ``error`` says the node went away (or is stopping) and this client
        waits for it to come back, rather than an answer of the node's own."""
        if not self._reached or self.reconnect_grace <= 0 or not isinstance(error, grpc.Call):
            return False
        kind = dict(error.trailing_metadata() or ()).get(ERROR_KEY)
        if kind:  # the node's own answer: only "I am shutting down" means come back later
            return kind == NodeUnavailableError.__name__
        # UNAVAILABLE: no connection, or a draining node refusing; CANCELLED: a drain
        # that ended the call, or a connection that broke mid-stream.
        return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

    def _wait_to_retry(self, error: grpc.RpcError, attempt: int) -> None:
        """Sleep a jittered, growing delay before asking again; once the node has been
        unreachable for the whole grace, raise an error that says so."""
        now = time.monotonic()
        with self._lock:
            if self._down_since is None:
                self._down_since = now
            down_for = now - self._down_since
        left = self.reconnect_grace - down_for
        if left <= 0:
            raise NodeUnavailableError(
                f"the cachefs node at {self.endpoint} has been unreachable for "
                f"{down_for:.0f} s, longer than the reconnect grace ({self.reconnect_grace:g} s, "
                f"{RECONNECT_GRACE_ENV}; last error: {_details(error)}); check that "
                "`cachefs node` runs there and restarts cleanly (its log, or the cachefs pod "
                "on this host), and that CACHEFS_ENDPOINT names it; raise "
                f"{RECONNECT_GRACE_ENV} if its restarts take longer"
            ) from error
        # Full jitter: clients of one node that restarts do not come back in step.
        ceiling = min(_RETRY_MAX_DELAY, _RETRY_FIRST_DELAY * 2 ** min(attempt, 16))
        time.sleep(min(left, random.uniform(0, ceiling)))

    # -- objects -------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block_size

    def stat(self, url: str) -> ObjectInfo:
        reply = self._call("Stat", pb.StatRequest(url=url))
        if reply.is_directory:
            raise IsADirectoryError(
                errno.EISDIR, f"{reply.url} is a directory; name an object in it"
            )
        if reply.block_size:
            self._block_size = reply.block_size
        # Reads name the object as the caller did (a signed URL stays signed).
        return messages.object_info(reply, handle=url)

    def _listing(self, request: pb.ListRequest) -> list[pb.Entry]:
        """Every entry of a List stream; asked again from the start if the node goes
        away meanwhile (a listing is idempotent)."""
        attempt = 0
        while True:
            try:
                entries: list[pb.Entry] = []
                for batch in self._stream("List", request, self.timeout, resumable=True):
                    entries.extend(batch.entries)
                return entries
            except _NodeWentAway as gone:
                self._wait_to_retry(gone.error, attempt)
                attempt += 1

    def ls(self, url: str) -> list[dict[str, Any]]:
        entries = self._listing(pb.ListRequest(url=url))
        return [
            {
                "name": e.name,
                "size": e.size,
                "type": e.type,
                **({"version": e.version} if e.version else {}),
            }
            for e in entries
        ]

    def local_path(self, info: ObjectInfo) -> str | None:
        """The node's file of a complete object, when this host sees that very file."""
        if not info.complete or not info.local_path:
            return None
        try:
            st = os.stat(info.local_path)
        except OSError:
            return None
        if st.st_ino != info.inode or st.st_size != info.size:
            return None
        return info.local_path

    def read(self, info: ObjectInfo, start: int, end: int) -> bytes:
        start, end = ranges.clipped(info.url, info.size, start, end)
        if end == start:
            return b""
        chunks = list(self._read_chunks(info, start, end - start))
        received = sum(len(c) for c in chunks)
        if received != end - start:
            raise IntegrityError(
                f"{info.url}: the node sent {received} of {end - start} bytes; read again"
            )
        return b"".join(chunks)

    def readinto(self, info: ObjectInfo, start: int, into: memoryview) -> None:
        if ranges.exact(info.url, info.size, start, len(into)) == start:
            return
        position = 0
        for data in self._read_chunks(info, start, len(into)):
            size = len(data)
            if position + size > len(into):
                raise IntegrityError(f"{info.url}: the node sent more bytes than asked for")
            into[position : position + size] = data
            position += size
        if position != len(into):
            raise IntegrityError(
                f"{info.url}: the node sent {position} of {len(into)} bytes; read again"
            )

    def _read_chunks(self, info: ObjectInfo, start: int, length: int) -> Iterator[bytes]:
        """The range's bytes as they arrive. If the node goes away mid-stream, the rest
        is asked for once it is back: from the exact byte reached, at the version this
        read is pinned to (never "the current one", which could splice two versions)."""
        received = 0
        attempt = 0
        while received < length:
            request = pb.ReadRequest(
                url=info.handle or info.url,
                version=info.version,
                size=info.size,
                offset=start + received,
                length=length - received,
                chunk_size=CHUNK_SIZE,
            )
            timeout = self._stream_timeout(length - received)
            try:
                for chunk in self._stream("Read", request, timeout, resumable=bool(info.version)):
                    received += len(chunk.data)
                    attempt = 0
                    yield chunk.data
                return
            except _NodeWentAway as gone:
                if attempt == 0:
                    log.warning(
                        "the cachefs node at %s went away while reading %s (%s); resuming at "
                        "byte %d of version %s once it is back (waiting up to %g s)",
                        self.endpoint,
                        info.url,
                        _details(gone.error),
                        start + received,
                        info.version,
                        self.reconnect_grace,
                    )
                self._wait_to_retry(gone.error, attempt)
                attempt += 1

    def _stream_timeout(self, length: int) -> float:
        return self.timeout + length / _SLOWEST_RATE

    def open_local(self, url: str) -> str:
        info = self.stat(url)
        if not info.complete:
            self.prefetch([url])
            info = self.stat(url)
        path = self.local_path(info)
        if path is None:
            raise FileNotFoundError(
                errno.ENOENT,
                f"{info.url} is cached by the node at {self.endpoint}, but its file "
                f"({info.local_path}) is not visible on this host; mount the node's cache "
                "root at the same path, or read through open()",
            )
        return path

    # -- prefetch and management -----------------------------------------------------

    def prefetch(
        self,
        sources: Sequence[str],
        pin: str | None = None,
        tier: str | None = None,
        progress: Callable[[JobStatus], None] | None = None,
        detach: bool = False,
        cluster: bool = False,
    ) -> JobStatus:
        started = self.start_job(
            pb.PrefetchRequest(
                sources=list(sources), pin_holder=pin or "", tier=tier or "", cluster=cluster
            )
        )
        if detach:
            return started
        try:
            return self.wait(started.id, progress)
        except KeyboardInterrupt as interrupt:
            # The caller gave up on the job it waited for: stop it on the node too, as a
            # download in the foreground would stop (--detach leaves one running).
            try:
                self.cancel(started.id)
                interrupt.add_note(
                    f"job {started.id} on the node was cancelled; the blocks it fetched "
                    "stay cached (prefetch --detach leaves a job running)"
                )
            except Exception as exc:
                interrupt.add_note(
                    f"job {started.id} may still run on the node ({exc}): cachefs cancel "
                    f"{started.id}"
                )
            raise

    def start_job(self, request: pb.PrefetchRequest, wait_for_ready: bool = False) -> JobStatus:
        """Start a prefetch job as ``request`` describes it; its first status.
        ``wait_for_ready``: a node whose channel is reconnecting (it just restarted) is
        waited for, within the client's timeout."""
        return messages.job_status(self._call("Prefetch", request, wait_for_ready=wait_for_ready))

    def job(self, job_id: str) -> JobStatus | None:
        """A job's latest status, or None when the node does not know it (restarted)."""
        reply = self._call("Status", pb.StatusRequest())
        return next((messages.job_status(j) for j in reply.jobs if j.id == job_id), None)

    def wait(
        self,
        job_id: str,
        progress: Callable[[JobStatus], None] | None = None,
        timeout: float | None = None,
    ) -> JobStatus:
        """Follow a job to its end and return its final status; raise its error if it
        failed. With ``timeout``, return the latest status once that many seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: JobStatus | None = None
        while last is None or not last.finished:
            left = _DAY if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            try:
                for message in self._stream("WatchJob", pb.JobRef(id=job_id), left):
                    last = messages.job_status(message)
                    if progress is not None:
                        progress(last)
            except TimeoutError:
                continue  # the deadline, or a day-long job: watch again or return
        if last is None:
            raise TimeoutError(errno.ETIMEDOUT, f"job {job_id} sent no status within {timeout:g}s")
        if last.state in ("failed", "cancelled"):
            raise rebuild(last.error_kind or "", last.error or f"the prefetch {last.state}")
        return last

    def cancel(self, job_id: str) -> JobStatus:
        return messages.job_status(self._call("Cancel", pb.JobRef(id=job_id)))

    def cached(self, source: str | None = None) -> list[CachedEntry]:
        entries = self._listing(pb.ListRequest(url=source or "", cached=True))
        return [messages.cached_entry(e) for e in entries]

    def evict(self, sources: Sequence[str]) -> EvictResult:
        reply = self._call("Evict", pb.EvictRequest(sources=list(sources)))
        return EvictResult(reply.objects, reply.bytes)

    def unpin(self, holder: str, sources: Sequence[str] = ()) -> int:
        return self._call("Unpin", pb.UnpinRequest(holder=holder, sources=list(sources))).objects

    def view(
        self,
        holder: str,
        sources: Sequence[str],
        tier: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> ViewInfo:
        """Build (or find) ``holder``'s view of ``sources`` on the node (its path there);
        with ``model``, of that CachedModel's ``version`` on the node."""
        request = pb.ViewRequest(
            holder=holder,
            sources=list(sources),
            tier=tier or "",
            model=model or "",
            version=version or "",
        )
        reply = self._call("View", request, timeout=_DAY)
        return ViewInfo(reply.path, reply.objects, reply.bytes)

    def model(self, namespace: str, name: str) -> ModelInfo:
        """A CachedModel as the node holds it."""
        request = pb.ModelRequest(namespace=namespace, name=name)
        return messages.model_info(self._call("Model", request))

    def status(self) -> NodeStatus:
        return messages.node_status(self._call("Status", pb.StatusRequest()))


class _NodeWentAway(Exception):
    """A resumable stream broke because the node went away (never leaves this module)."""

    def __init__(self, error: grpc.RpcError) -> None:
        super().__init__(_details(error))
        self.error = error


def _details(error: grpc.RpcError) -> str:
    """What gRPC said about a failed call, for a log line or a message."""
    details = error.details() if isinstance(error, grpc.Call) else None
    return details or str(error)


def close_clients() -> None:
    """Close this process's node channels (a later call opens new ones)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()
