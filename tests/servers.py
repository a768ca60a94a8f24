"""Real origin servers for tests: an S3 endpoint (moto) and a ranged HTTP/1.1 server.

Tests run the cache against real network servers rather than mocks, so every origin
request is observable: each server logs what it was asked for (method, path, Range,
If-Match), can be told to fail the next requests (to exercise retries), and can hold
GETs at a gate until the test releases them (to act while a read is in flight, e.g.
overwrite the object or read the part already cached).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

T = TypeVar("T")

# Distinctive dummy credentials, so a test can grep logs, errors and files for leaks.
TEST_ACCESS_KEY = "AKIACACHEFSTESTKEY01"
TEST_SECRET_KEY = "cachefs-test-secret-5f1d9e"
TEST_REGION = "us-east-1"

# Variables that could point an AWS client at real credentials or another endpoint.
AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)

# User-Agent marker of the harness's own S3 client; its requests are not logged.
_HARNESS_AGENT = "cachefs-test-harness"

ByteRange = tuple[int, int | None]


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it is truthy and return its value; fail at the deadline.

    Tests synchronise on observable state with a deadline, never on a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def parse_range(header: str | None) -> ByteRange | None:
    """Parse a single ``bytes=`` Range header: ``(start, end)`` with inclusive end.

    ``bytes=a-`` gives ``(a, None)``; a suffix ``bytes=-n`` gives ``(-n, None)``.
    Returns None when there is no header; raises ValueError when it is not one range.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise ValueError(f"unsupported Range header {header!r}")
    first, dash, last = spec.strip().partition("-")
    if not dash or (not first and not last):
        raise ValueError(f"malformed Range header {header!r}")
    if not first:
        return (-int(last), None)
    start = int(first)
    end = int(last) if last else None
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"malformed Range header {header!r}")
    return (start, end)


@dataclass
class RequestRecord:
    """One request as the origin saw it, so tests can count and inspect origin traffic."""

    method: str
    path: str
    query: str
    range: str | None
    if_match: str | None
    bucket: str | None = None
    key: str | None = None
    object_request: bool = False
    status: int | None = None
    aborted: bool = False
    time: float = field(default_factory=time.monotonic)
    target: str = ""  # HTTP: the request target as it arrived (path and query, undecoded)

    @property
    def object_get(self) -> bool:
        """True for a GET of an object's bytes (not HEAD, listing or index page)."""
        return self.object_request and self.method == "GET"

    @property
    def byte_range(self) -> ByteRange | None:
        """The parsed Range header; None for a full GET (or an unparseable header)."""
        try:
            return parse_range(self.range)
        except ValueError:
            return None


class Gate:
    """Holds matching GETs before the server handles them, until the test releases them.

    Because the request is held before the origin reads its data, a test can overwrite
    the object while a read is in flight, or check what a reader sees of a partly
    fetched object. A held request proceeds by itself after ``max_hold`` seconds (and
    ``timed_out`` becomes True) so a forgotten gate cannot hang the suite.
    """

    def __init__(
        self,
        key: str | None,
        *,
        bucket: str | None = None,
        min_start: int | None = None,
        predicate: Callable[[RequestRecord], bool] | None = None,
        max_hold: float = 60.0,
    ) -> None:
        self.key = key
        self.bucket = bucket
        self.min_start = min_start
        self.predicate = predicate
        self.max_hold = max_hold
        self.arrived = threading.Event()
        self.timed_out = False
        self._released = threading.Event()
        self._cond = threading.Condition()
        self._held = 0
        self._hits = 0

    def matches(self, record: RequestRecord) -> bool:
        """Whether this gate applies to ``record`` (an object GET of its key)."""
        if not record.object_get or self._released.is_set():
            return False
        if self.key is not None and record.key != self.key:
            return False
        if self.bucket is not None and record.bucket != self.bucket:
            return False
        if self.min_start is not None:
            byte_range = record.byte_range
            start = 0 if byte_range is None else byte_range[0]
            if start < self.min_start:
                return False
        return self.predicate is None or self.predicate(record)

    def hold(self) -> None:
        """Block the calling request thread until released (or ``max_hold`` passes)."""
        with self._cond:
            self._held += 1
            self._hits += 1
            self._cond.notify_all()
        self.arrived.set()
        try:
            if not self._released.wait(self.max_hold):
                self.timed_out = True
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    @property
    def held(self) -> int:
        """How many requests are waiting at the gate now."""
        with self._cond:
            return self._held

    @property
    def hits(self) -> int:
        """How many requests have been held by this gate in total."""
        with self._cond:
            return self._hits

    @property
    def released(self) -> bool:
        """Whether the gate has been opened."""
        return self._released.is_set()

    def wait_held(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` requests are waiting at the gate at once."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._held >= count, timeout):
                raise AssertionError(
                    f"timed out after {timeout}s: {self._held} of {count} request(s) "
                    f"held at the gate for {self.key!r}"
                )

    def release(self) -> None:
        """Let every held and future matching request through."""
        self._released.set()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Fault:
    """The next ``remaining`` matching requests get an error status."""

    remaining: int
    status: int
    key: str | None
    bucket: str | None
    methods: tuple[str, ...]
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. Retry-After

    def matches(self, record: RequestRecord) -> bool:
        return (
            self.remaining > 0
            and record.object_request
            and record.method in self.methods
            and (self.key is None or record.key == self.key)
            and (self.bucket is None or record.bucket == self.bucket)
        )


class _Recorder:
    """Request log, injected faults and gates shared by both servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self._gates: list[Gate] = []

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every logged request, oldest first."""
        with self._lock:
            return list(self._records)

    def reset_requests(self) -> None:
        """Forget logged requests, so a test counts only the traffic it causes."""
        with self._lock:
            self._records.clear()

    def reset(self) -> None:
        """Clear the log and pending faults, and open every gate."""
        with self._lock:
            self._records.clear()
            self._faults.clear()
            gates, self._gates = self._gates, []
        for gate in gates:
            gate.release()

    def _fail_next(
        self,
        n: int,
        status: int,
        key: str | None,
        bucket: str | None,
        methods: Iterable[str],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("n must be at least 1")
        fault = _Fault(
            n, status, key, bucket, tuple(m.upper() for m in methods), dict(headers or {})
        )
        with self._lock:
            self._faults.append(fault)

    def _add_gate(self, gate: Gate) -> Gate:
        with self._lock:
            self._gates.append(gate)
        return gate

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def _pass_gates(self, record: RequestRecord) -> None:
        with self._lock:
            gates = list(self._gates)
        # Predicates run outside the lock: they may look at the request log.
        for gate in [gate for gate in gates if gate.matches(record)]:
            gate.hold()

    def _take_fault(self, record: RequestRecord) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(record):
                    fault.remaining -= 1
                    return fault
        return None

    def _ranges(self, records: Iterable[RequestRecord]) -> list[ByteRange | None]:
        return [record.byte_range for record in records]


# --------------------------------------------------------------------------- S3


_S3_ERRORS = {
    400: ("InvalidRequest", "Invalid request."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    412: ("PreconditionFailed", "At least one of the preconditions you specified did not hold."),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}

# Query parameters that may accompany a plain GET/HEAD of an object's bytes.
_OBJECT_QUERY_OK = {"versionId", "partNumber", "x-id"}


def _is_object_query(query: str) -> bool:
    names = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
    return all(
        n in _OBJECT_QUERY_OK
        or n.startswith("response-")
        or n.lower().startswith("x-amz-")  # presigned (SigV4) URLs
        or n in ("AWSAccessKeyId", "Signature", "Expires")  # presigned (SigV2) URLs
        for n in names
    )


def s3_error_body(status: int, resource: str) -> bytes:
    """An S3-style XML error document, so clients parse injected faults as real ones."""
    code, message = _S3_ERRORS.get(status, ("InternalError", "Injected failure."))
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{html.escape(message)}</Message>"
        f"<Resource>{html.escape(resource)}</Resource><RequestId>{request_id}</RequestId>"
        "</Error>"
    ).encode()


class _S3Middleware:
    """WSGI layer in front of moto: logs requests, applies gates and injected faults."""

    def __init__(self, app: Any, owner: S3Server) -> None:
        self.app = app
        self.owner = owner

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if _HARNESS_AGENT in environ.get("HTTP_USER_AGENT", ""):
            return self.app(environ, start_response)
        raw_path = environ.get("PATH_INFO", "")
        path = raw_path.encode("latin-1").decode("utf-8", "replace")
        query = environ.get("QUERY_STRING", "")
        bucket, _, key = path.lstrip("/").partition("/")
        record = RequestRecord(
            method=environ.get("REQUEST_METHOD", ""),
            path=path,
            query=query,
            range=environ.get("HTTP_RANGE"),
            if_match=environ.get("HTTP_IF_MATCH"),
            bucket=bucket or None,
            key=key or None,
            object_request=bool(bucket and key) and _is_object_query(query),
        )
        owner = self.owner
        owner._log(record)
        owner._pass_gates(record)
        fault = owner._take_fault(record)
        if fault is not None:
            status = record.status = fault.status
            body = b"" if record.method == "HEAD" else s3_error_body(status, path)
            start_response(
                f"{status} {HTTPStatus(status).phrase}",
                [
                    ("Content-Type", "application/xml"),
                    ("Content-Length", str(len(body))),
                    ("x-amz-request-id", uuid.uuid4().hex[:16].upper()),
                    *fault.headers.items(),
                ],
            )
            return [body]

        def recording_start_response(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            record.status = int(status_line.split()[0])
            return start_response(status_line, headers, exc_info)

        return self.app(environ, recording_start_response)


class S3Server(_Recorder):
    """A real S3 endpoint (moto's server) on 127.0.0.1 with a random port.

    Every request from the code under test is logged; the harness's own setup calls
    (``create_bucket``, ``put``...) are not, so counts reflect only the cache's traffic.
    """

    def __init__(self) -> None:
        super().__init__()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._client: Any = None

    def start(self) -> None:
        """Bind to a free port and serve in a background thread."""
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                """Keep per-request lines out of test output."""

        app = _S3Middleware(DomainDispatcherApplication(create_backend_app), self)
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="s3-origin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Open all gates, stop serving and free the port."""
        self.reset()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        self._client = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("S3Server is not started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The endpoint URL to give S3 clients."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment that points AWS clients here with the test credentials.

        Shared config files are disabled and instance metadata is off, so no client
        reaches for real credentials or waits on a metadata endpoint.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_REGION": TEST_REGION,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    @property
    def client(self) -> Any:
        """The harness's own boto3 client (its requests are not logged or faulted)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=TEST_ACCESS_KEY,
                aws_secret_access_key=TEST_SECRET_KEY,
                region_name=TEST_REGION,
                config=Config(
                    user_agent_extra=_HARNESS_AGENT,
                    s3={"addressing_style": "path"},
                    retries={"total_max_attempts": 1, "mode": "standard"},
                ),
            )
        return self._client

    def create_bucket(self, name: str) -> None:
        """Create a bucket (names need at least 3 characters)."""
        self.client.create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and every object in it."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=name, Delete={"Objects": keys})
        self.client.delete_bucket(Bucket=name)

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Create or overwrite an object; returns its ETag (quoted, as S3 sends it)."""
        return str(self.client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"])

    def get(self, bucket: str, key: str) -> bytes:
        """Read an object's current bytes without logging the request."""
        return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def delete(self, bucket: str, key: str) -> None:
        """Delete an object."""
        self.client.delete_object(Bucket=bucket, Key=key)

    def _object_records(self, method: str, key: str, bucket: str | None) -> list[RequestRecord]:
        return [
            r
            for r in self.requests
            if r.object_request
            and r.method == method
            and r.key == key
            and (bucket is None or r.bucket == bucket)
        ]

    def gets(self, key: str, bucket: str | None = None) -> list[ByteRange | None]:
        """Ranges of every GET of ``key``'s bytes, in order; None marks a full GET.

        Ends are inclusive, as in the Range header. Failed (faulted) GETs are included;
        check ``requests`` for their status.
        """
        return self._ranges(self._object_records("GET", key, bucket))

    def heads(self, key: str, bucket: str | None = None) -> int:
        """How many HEAD requests ``key`` received."""
        return len(self._object_records("HEAD", key, bucket))

    def fail_next(
        self,
        n: int,
        status: int = 503,
        key: str | None = None,
        bucket: str | None = None,
        methods: Iterable[str] = ("GET",),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``n`` matching object requests with ``status`` and an S3 error
        (and ``headers``, such as a ``Retry-After``).

        503 sends SlowDown, 500 InternalError, 403 AccessDenied, 404 NoSuchKey.
        """
        self._fail_next(n, status, key, bucket, methods, headers)

    def hold_gets(
        self,
        key: str | None,
        predicate: Callable[[RequestRecord], bool] | None = None,
        *,
        min_start: int | None = None,
        bucket: str | None = None,
        max_hold: float = 60.0,
    ) -> Gate:
        """Hold GETs of ``key`` (whose range starts at or after ``min_start``) at a gate."""
        gate = Gate(key, bucket=bucket, min_start=min_start, predicate=predicate, max_hold=max_hold)
        return self._add_gate(gate)


class S3Bucket:
    """One test's private bucket on a shared S3Server, with bucket-scoped helpers."""

    def __init__(self, server: S3Server, name: str) -> None:
        self.server = server
        self.name = name

    @property
    def endpoint(self) -> str:
        """The endpoint URL to give S3 clients."""
        return self.server.endpoint

    def env(self) -> dict[str, str]:
        """Environment that points AWS clients at the server (see ``S3Server.env``)."""
        return self.server.env()

    def url(self, key: str) -> str:
        """The ``s3://`` URL of ``key`` in this bucket."""
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> str:
        """Create or overwrite an object; returns its quoted ETag."""
        return self.server.put(self.name, key, data)

    def get(self, key: str) -> bytes:
        """Read an object's current bytes without logging the request."""
        return self.server.get(self.name, key)

    def delete(self, key: str) -> None:
        """Delete an object."""
        self.server.delete(self.name, key)

    @property
    def requests(self) -> list[RequestRecord]:
        """Logged requests that addressed this bucket."""
        return [r for r in self.server.requests if r.bucket == self.name]

    def reset_requests(self) -> None:
        """Forget logged requests."""
        self.server.reset_requests()

    def gets(self, key: str) -> list[ByteRange | None]:
        """Ranges of every GET of ``key``'s bytes; None marks a full GET."""
        return self.server.gets(key, bucket=self.name)

    def heads(self, key: str) -> int:
        """How many HEAD requests ``key`` received."""
        return self.server.heads(key, bucket=self.name)

    def fail_next(
        self,
        n: int,
        status: int = 503,
        key: str | None = None,
        methods: Iterable[str] = ("GET",),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Fail the next ``n`` matching requests in this bucket with ``status``."""
        self.server.fail_next(
            n, status, key=key, bucket=self.name, methods=methods, headers=headers
        )

    def hold_gets(
        self,
        key: str | None,
        predicate: Callable[[RequestRecord], bool] | None = None,
        *,
        min_start: int | None = None,
        max_hold: float = 60.0,
    ) -> Gate:
        """Hold GETs of ``key`` in this bucket at a gate until released."""
        return self.server.hold_gets(
            key, predicate, min_start=min_start, bucket=self.name, max_hold=max_hold
        )


# ------------------------------------------------------------------------- HTTP


@dataclass
class _HttpObject:
    data: bytes
    etag: str
    mtime: float


@dataclass
class _Reset:
    remaining: int
    path: str | None
    after: int | None


@dataclass
class _Drip:
    remaining: int
    path: str | None
    bytes_per_second: int


class _OriginHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    origin: RangeHTTPServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client hangs up mid-response; that is routine in tests."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cachefs-test-origin/1.0"
    timeout = 30  # idle keep-alive connections end by themselves
    server: _OriginHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.origin._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.origin._track(self.connection, add=False)

    def do_GET(self) -> None:
        self.server.origin._serve(self, head=False)

    def do_HEAD(self) -> None:
        self.server.origin._serve(self, head=True)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep per-request lines out of test output."""


def _normpath(path: str) -> str:
    if path.startswith(("http://", "https://")):
        path = unquote(urlsplit(path).path)
    return path if path.startswith("/") else "/" + path


class RangeHTTPServer(_Recorder):
    """A threaded HTTP/1.1 origin serving in-memory files with ranges and validators.

    Knobs (plain attributes, may be flipped mid-test): ``ignore_if_match`` makes the
    server skip If-Match so the client's own version check is what catches a change;
    ``send_etag=False`` drops ETag so versions fall back to size and Last-Modified;
    ``ignore_range`` answers every GET with the whole body (200), as some servers do.
    ``repr_digest`` ("sha-256" or "sha-512") sends each file's Repr-Digest (RFC 9530);
    ``set_headers`` adds headers to the answers about one file.
    """

    def __init__(
        self,
        *,
        ignore_if_match: bool = False,
        send_etag: bool = True,
        ignore_range: bool = False,
    ) -> None:
        super().__init__()
        self.ignore_if_match = ignore_if_match
        self.send_etag = send_etag
        self.ignore_range = ignore_range
        self.repr_digest: str | None = None
        self._file_headers: dict[str, dict[str, str]] = {}
        self._files: dict[str, _HttpObject] = {}
        self._resets: list[_Reset] = []
        self._drips: list[_Drip] = []
        self._connections: set[socket.socket] = set()
        self.connections_opened = 0  # every connection a client opened, ever
        self._last_mtime = 0.0
        self._server: _OriginHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        """Bind to a free port and serve in a background thread."""
        self._server = _OriginHTTPServer(("127.0.0.1", 0), _OriginHandler)
        self._server.origin = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="http-origin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Open all gates, drop open connections, stop serving and free the port."""
        self.reset()
        if self._server is not None:
            self._server.shutdown()
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> RangeHTTPServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
                self.connections_opened += 1
            else:
                self._connections.discard(conn)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("RangeHTTPServer is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` with no trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The full URL of ``path`` (leading slash optional)."""
        return self.base_url + quote(_normpath(path))

    # -- content

    def put(self, path: str, data: bytes, mtime: float | None = None) -> str:
        """Create or replace a file; returns its quoted ETag.

        Last-Modified strictly increases on each put (unless ``mtime`` is given), so
        a size+Last-Modified version changes even when two puts share a second.
        """
        path = _normpath(path)
        if path.endswith("/"):
            raise ValueError("file paths cannot end with '/'")
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        with self._lock:
            if mtime is None:
                mtime = max(float(int(time.time())), self._last_mtime + 1)
            self._last_mtime = max(self._last_mtime, mtime)
            self._files[path] = _HttpObject(bytes(data), etag, mtime)
        return etag

    def delete(self, path: str) -> None:
        """Remove a file (KeyError if absent)."""
        with self._lock:
            del self._files[_normpath(path)]

    def set_headers(self, path: str, headers: Mapping[str, str]) -> None:
        """Send ``headers`` with every answer about ``path`` (a wrong Repr-Digest, a
        model hub's X-Linked-Etag)."""
        with self._lock:
            self._file_headers[_normpath(path)] = dict(headers)

    def etag(self, path: str) -> str:
        """The current quoted ETag of ``path``."""
        with self._lock:
            return self._files[_normpath(path)].etag

    def last_modified(self, path: str) -> str:
        """The current Last-Modified header value of ``path``."""
        with self._lock:
            return formatdate(self._files[_normpath(path)].mtime, usegmt=True)

    # -- observation and faults

    def gets(self, path: str) -> list[ByteRange | None]:
        """Ranges of every GET of ``path``'s bytes, in order; None marks a full GET."""
        path = _normpath(path)
        return self._ranges(r for r in self.requests if r.object_get and r.path == path)

    def heads(self, path: str) -> int:
        """How many HEAD requests ``path`` received."""
        path = _normpath(path)
        return sum(1 for r in self.requests if r.method == "HEAD" and r.path == path)

    def fail_next(
        self,
        n: int,
        status: int = 503,
        path: str | None = None,
        methods: Iterable[str] = ("GET",),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``n`` matching file requests with ``status`` (and ``headers``,
        such as a ``Retry-After``)."""
        self._fail_next(
            n, status, None if path is None else _normpath(path), None, methods, headers
        )

    def drip_next(self, n: int, path: str | None, bytes_per_second: int) -> None:
        """Send the body of the next ``n`` GETs of ``path`` at ``bytes_per_second``: a
        stalled origin that still answers every read in time."""
        target = None if path is None else _normpath(path)
        with self._lock:
            self._drips.append(_Drip(n, target, bytes_per_second))

    def reset_connection_next(
        self, n: int, path: str | None = None, after: int | None = None
    ) -> None:
        """Cut the connection mid-body for the next ``n`` GETs of ``path`` (any if None).

        Headers (with the full Content-Length) and ``after`` bytes of the body (default:
        half of it) are sent, then the socket is shut down.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        target = None if path is None else _normpath(path)
        with self._lock:
            self._resets.append(_Reset(n, target, after))

    def hold_gets(
        self,
        path: str | None,
        predicate: Callable[[RequestRecord], bool] | None = None,
        *,
        min_start: int | None = None,
        max_hold: float = 60.0,
    ) -> Gate:
        """Hold GETs of ``path`` (range starting at or after ``min_start``) at a gate."""
        target = None if path is None else _normpath(path)
        gate = Gate(target, min_start=min_start, predicate=predicate, max_hold=max_hold)
        return self._add_gate(gate)

    def reset(self) -> None:
        """Clear the log, pending faults and resets, and open every gate."""
        with self._lock:
            self._resets.clear()
            self._drips.clear()
        super().reset()

    def _take_drip(self, record: RequestRecord) -> _Drip | None:
        return self._take(self._drips, record)

    def _take_reset(self, record: RequestRecord) -> _Reset | None:
        return self._take(self._resets, record)

    def _take(self, pending: list[Any], record: RequestRecord) -> Any:
        """The first of ``pending`` (resets, drips) still due for ``record``'s path."""
        with self._lock:
            for item in pending:
                if item.remaining > 0 and item.path in (None, record.path):
                    item.remaining -= 1
                    return item
        return None

    # -- request handling

    def _serve(self, handler: _OriginHandler, head: bool) -> None:
        split = urlsplit(handler.path)
        path = _normpath(unquote(split.path))
        record = RequestRecord(
            method=handler.command,
            path=path,
            query=split.query,
            range=handler.headers.get("Range"),
            if_match=handler.headers.get("If-Match"),
            key=path,
            object_request=not path.endswith("/"),
            target=handler.path,
        )
        self._log(record)
        self._pass_gates(record)
        fault = self._take_fault(record)
        if fault is not None:
            self._send(handler, record, fault.status, fault.headers, b"injected failure\n", head)
            return
        if path.endswith("/"):
            self._serve_index(handler, record, path, head)
            return
        with self._lock:
            obj = self._files.get(path)
            has_children = obj is None and any(p.startswith(path + "/") for p in self._files)
        if obj is None:
            if has_children:
                location = quote(path + "/")
                self._send(handler, record, 301, {"Location": location}, b"", head)
            else:
                self._send(handler, record, 404, {}, b"not found\n", head)
            return
        headers = {
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(obj.mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
        }
        if self.send_etag:
            headers["ETag"] = obj.etag
        if self.repr_digest is not None:
            digest = hashlib.new(self.repr_digest.replace("-", ""), obj.data).digest()
            headers["Repr-Digest"] = f"{self.repr_digest}=:{base64.b64encode(digest).decode()}:"
        with self._lock:
            headers.update(self._file_headers.get(path, {}))
        if record.if_match is not None and not self.ignore_if_match:
            tags = [t.strip() for t in record.if_match.split(",")]
            if "*" not in tags and (not self.send_etag or obj.etag not in tags):
                self._send(handler, record, 412, headers, b"precondition failed\n", head)
                return
        size = len(obj.data)
        status, body = 200, obj.data
        if record.range is not None and not self.ignore_range:
            try:
                byte_range = parse_range(record.range)
            except ValueError:
                byte_range = None  # an unusable Range is ignored: whole body
            if byte_range is not None:
                start, end = byte_range
                if start < 0:
                    start = max(0, size + start)
                    end = size - 1
                if start >= size or size == 0:
                    headers["Content-Range"] = f"bytes */{size}"
                    self._send(handler, record, 416, headers, b"", head)
                    return
                end = size - 1 if end is None else min(end, size - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                status, body = 206, obj.data[start : end + 1]
        drip = None if head else self._take_drip(record)
        if drip is not None:
            self._send_dripping(handler, record, status, headers, body, drip)
            return
        reset = None if head else self._take_reset(record)
        if reset is not None:
            self._send_truncated(handler, record, status, headers, body, reset)
            return
        self._send(handler, record, status, headers, body, head)

    def _serve_index(
        self, handler: _OriginHandler, record: RequestRecord, prefix: str, head: bool
    ) -> None:
        with self._lock:
            names = sorted(
                {
                    rest.split("/", 1)[0] + ("/" if "/" in rest else "")
                    for p in self._files
                    if p.startswith(prefix) and (rest := p[len(prefix) :])
                }
            )
        if not names and prefix != "/":
            self._send(handler, record, 404, {}, b"not found\n", head)
            return
        title = html.escape(f"Index of {prefix}")
        items = "".join(
            f'<li><a href="{html.escape(quote(name))}">{html.escape(name)}</a></li>\n'
            for name in names
        )
        page = (
            f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>\n"
            f"<body><h1>{title}</h1>\n<ul>\n{items}</ul></body></html>\n"
        ).encode()
        headers = {"Content-Type": "text/html; charset=utf-8"}
        self._send(handler, record, 200, headers, page, head)

    @staticmethod
    def _begin(
        handler: _OriginHandler,
        record: RequestRecord,
        status: int,
        headers: Mapping[str, str],
        length: int,
    ) -> None:
        record.status = status
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()

    def _send(
        self,
        handler: _OriginHandler,
        record: RequestRecord,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        head: bool,
    ) -> None:
        self._begin(handler, record, status, headers, len(body))
        if not head and body:
            handler.wfile.write(body)

    def _send_dripping(
        self,
        handler: _OriginHandler,
        record: RequestRecord,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        drip: _Drip,
    ) -> None:
        """The body a few bytes at a time, until it ends or the client hangs up."""
        piece = max(1, drip.bytes_per_second // 20)
        self._begin(handler, record, status, headers, len(body))
        try:
            for offset in range(0, len(body), piece):
                handler.wfile.write(body[offset : offset + piece])
                handler.wfile.flush()
                time.sleep(piece / drip.bytes_per_second)  # the origin's pace, not a wait
        except OSError:
            record.aborted = True
        handler.close_connection = True

    def _send_truncated(
        self,
        handler: _OriginHandler,
        record: RequestRecord,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        reset: _Reset,
    ) -> None:
        after = len(body) // 2 if reset.after is None else reset.after
        after = max(0, min(after, len(body) - 1))
        record.aborted = True
        self._begin(handler, record, status, headers, len(body))
        handler.wfile.write(body[:after])
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------- run as nobody

NOBODY_UID = 65534
NOBODY_GID = 65534


class NobodyRunner:
    """Runs commands as uid/gid 65534 with no supplementary groups.

    Root bypasses file permissions, so permission tests need an unprivileged process.
    ``python`` is an interpreter that user can execute with this environment's
    packages importable: the test interpreter when it can reach it, else the system
    interpreter of the same version with this environment's paths on PYTHONPATH.
    """

    def __init__(self, python: Sequence[str], home: Path, extra_env: Mapping[str, str]) -> None:
        self.python = list(python)
        self.home = home
        self.extra_env = dict(extra_env)

    def __call__(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a string of Python code) and capture its text output.

        ``env`` entries are added to the current environment.
        """
        argv = [*self.python, "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = {**os.environ, "HOME": str(self.home), "PYTHONDONTWRITEBYTECODE": "1"}
        full_env.update(self.extra_env)
        if env:
            full_env.update(env)
        return subprocess.run(
            argv,
            user=NOBODY_UID,
            group=NOBODY_GID,
            extra_groups=[],
            env=full_env,
            cwd=os.fspath(cwd if cwd is not None else self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
        )


def make_traversable(path: Path, stop: Path) -> None:
    """Add search (o+x, not read) permission to ``path`` and its parents up to ``stop``.

    Test temp dirs are created 0700; without this every access by another user fails
    there, and permission tests would pass no matter what modes the code set.
    """
    if not path.is_relative_to(stop):
        raise ValueError(f"{path} is not under {stop}")
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod(mode | 0o001)
        if directory == stop:
            break


def self_signed_cert(
    directory: Path, name: str = "tls", hosts: Sequence[str] = ("127.0.0.1",)
) -> tuple[Path, Path]:
    """A certificate for ``hosts`` (IP addresses) that signs itself, and its key: (cert,
    key) PEM files.

    A client trusts it with ``SSL_CERT_FILE=<cert>`` (OpenSSL's default verify paths).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name_attr = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name_attr)
        .issuer_name(name_attr)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)) for host in hosts]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
