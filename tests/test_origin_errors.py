"""S3 errors before any bytes: credentials that are missing or refused, and prefix
listings that fail.

Missing credentials are final: a retry cannot find them, so they fail at once with a
message that says whose environment lacks them (the process that reads the origin:
the node when a client names one) and where they go. A listing's errors are a
stat's: named, transient ones retried with the same policy, the rest final.

The origin is moto's S3 server; a listing's faults come from a small proxy in front
of it, since the server's own fault injection covers object requests only.
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from daemon import NodeProcess, run_cli
from servers import S3Bucket

from cachefs.node.engine import Engine

DATA = b"weights!" * 4096  # 32 KiB
RETRY_LINE = re.compile(r"retry \d+ of \d+")
QUICK_RETRY = {"attempts": 5, "base_delay": 0.01, "max_delay": 0.02}
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class ListFaultProxy:
    """An HTTP proxy in front of an S3 server that answers the next prefix listings
    (``GET /bucket?list-type=2``) with an S3 error, and counts the listings."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._faults: list[tuple[int, str]] = []
        self.lists = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner._forward(self, "GET")

            def do_HEAD(self) -> None:
                owner._forward(self, "HEAD")

            def log_message(self, format: str, *args: Any) -> None:
                """Keep per-request lines out of test output."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_lists(self, n: int, status: int, code: str) -> None:
        """Answer the next ``n`` listings with ``status`` and the S3 error ``code``."""
        with self._lock:
            self._faults += [(status, code)] * n

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _forward(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        listing = (
            method == "GET" and "/" not in parts.path.strip("/") and "list-type=" in (parts.query)
        )
        fault = None
        with self._lock:
            if listing:
                self.lists += 1
                fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            status, code = fault
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        upstream = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            upstream.request(method, handler.path, headers=dict(handler.headers.items()))
            response = upstream.getresponse()
            body = response.read()
        finally:
            upstream.close()
        handler.send_response(response.status)
        skip = {"transfer-encoding", "connection", "content-length", "server", "date"}
        for name, value in response.getheaders():
            if name.lower() not in skip:
                handler.send_header(name, value)
        length = response.getheader("Content-Length") if method == "HEAD" else None
        handler.send_header("Content-Length", length or str(len(body)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)


@pytest.fixture
def proxy(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[ListFaultProxy]:
    """A listing fault proxy in front of the test's S3 server, which this process's
    AWS clients are pointed at."""
    server = ListFaultProxy(s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    yield server
    server.close()


@pytest.fixture
def no_credentials(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """The S3 fixture's environment without its credentials (the config files are
    already empty and instance metadata off), for the processes this test starts."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return s3


def _assert_says_where_credentials_go(message: str, url: str) -> None:
    assert f"no AWS credentials for {url.rstrip('/')}" in message, message
    assert "the cachefs node, when a client names an endpoint" in message, message
    assert "AWS_ACCESS_KEY_ID" in message and "origins.envFromSecret" in message, message
    assert "reachable" not in message and "Unable to locate" not in message, message


# -- no credentials -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "detail"),
    [
        ({}, "none were found"),
        ({"AWS_ACCESS_KEY_ID": "AKIAONLYTHEKEY000000"}, "env lacks AWS_SECRET_ACCESS_KEY"),
        ({"AWS_PROFILE": "cachefs-no-such-profile"}, "'cachefs-no-such-profile'"),
    ],
    ids=["none", "partial", "unknown-profile"],
)
@pytest.mark.parametrize("what", ["prefix", "object"])
def test_cli_without_credentials_fails_at_once_and_says_where_they_go(
    what: str, environment: dict[str, str], detail: str, no_credentials: S3Bucket, tmp_path: Path
) -> None:
    """Neither a listing nor a HEAD is retried for want of credentials, nothing
    unsigned reaches the origin, and the message names the variables, not "reachable"."""
    s3 = no_credentials
    s3.put("m/a.bin", DATA)
    url = s3.url("m/") if what == "prefix" else s3.url("m/a.bin")
    result = run_cli("--cache-dir", str(tmp_path / "cache"), "-v", "prefetch", url, env=environment)
    assert result.returncode == 1, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("cachefs: error:")]
    assert len(error) == 1, result.stderr
    _assert_says_where_credentials_go(error[0], url)
    assert detail in error[0]
    assert not RETRY_LINE.search(result.stderr), result.stderr  # one attempt, no retry
    assert s3.requests == []


def test_node_without_credentials_says_the_node_lacks_them(
    s3: S3Bucket, start_node: Callable[..., NodeProcess]
) -> None:
    """A client with credentials prefetching through a node without them is told the
    node lacks them; the node tried the listing once."""
    s3.put("m/a.bin", DATA)
    node = start_node(env={name: "" for name in CREDENTIAL_VARIABLES})
    result = run_cli("--endpoint", node.unix_endpoint, "prefetch", s3.url("m/"))
    assert result.returncode == 1, result.stderr
    _assert_says_where_credentials_go(result.stderr, s3.url("m/"))
    assert node.metric("cachefs_origin_request_seconds_count", operation="list") == 1
    assert node.metric("cachefs_errors_total", kind="PermissionError") == 1
    assert s3.requests == []


# -- prefix listings --------------------------------------------------------------------


def test_a_listing_that_fails_transiently_is_retried(
    proxy: ListFaultProxy, s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """Two 503s, then the listing: retried with the reads' policy, and fetched."""
    s3.put("m/a.bin", DATA)
    s3.put("m/b.bin", DATA[:1000])
    engine = make_engine(retry=QUICK_RETRY)
    proxy.fail_lists(2, 503, "ServiceUnavailable")
    result = engine.prefetch([s3.url("m/")])
    assert result.objects == 2 and result.bytes == len(DATA) + 1000
    assert proxy.lists == 3
    assert engine.stats.origin_requests["list"] == 3


def test_a_listing_that_keeps_failing_gives_up_after_the_attempts(
    proxy: ListFaultProxy, s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    s3.put("m/a.bin", DATA)
    engine = make_engine(retry={**QUICK_RETRY, "attempts": 3})
    proxy.fail_lists(3, 500, "InternalError")
    with pytest.raises(ConnectionError) as info:
        engine.prefetch([s3.url("m/")])
    message = str(info.value)
    assert s3.url("m") in message and "after 3 attempts" in message
    assert "HTTP 500 InternalError" in message
    assert proxy.lists == 3


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        ("AccessDenied", "the origin denied access to"),
        ("InvalidAccessKeyId", "the origin refused the AWS credentials used for"),
        ("SignatureDoesNotMatch", "the origin refused the AWS credentials used for"),
    ],
)
def test_a_denied_listing_fails_at_once(
    code: str,
    advice: str,
    proxy: ListFaultProxy,
    s3: S3Bucket,
    make_engine: Callable[..., Engine],
) -> None:
    """A 403 is final: one listing, a PermissionError naming the URL and whose
    credentials to check, the server's own text only in the cause."""
    s3.put("m/a.bin", DATA)
    engine = make_engine(retry=QUICK_RETRY)
    proxy.fail_lists(1, 403, code)
    with pytest.raises(PermissionError) as info:
        engine.prefetch([s3.url("m/")])
    message = str(info.value)
    assert f"{advice} {s3.url('m')} (HTTP 403 {code})" in message
    assert "the process that reads the origin" in message and "injected" not in message
    assert info.value.__cause__ is not None
    assert proxy.lists == 1
    assert engine.prefetch([s3.url("m/")]).objects == 1  # no fault left


@pytest.mark.parametrize("what", ["prefix", "object"])
def test_a_missing_bucket_is_named(
    what: str, s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """No such bucket: FileNotFoundError naming it, not an empty listing; one listing
    of it at most per look (the object's HEAD, then its prefix), no retries."""
    bucket = f"cachefs-missing-{uuid.uuid4().hex[:8]}"
    url = f"s3://{bucket}/m/" if what == "prefix" else f"s3://{bucket}/m/a.bin"
    engine = make_engine(retry=QUICK_RETRY)
    with pytest.raises(FileNotFoundError) as info:
        engine.prefetch([url])
    message = str(info.value)
    assert f"no such bucket at the origin: {bucket} (for s3://{bucket}/m" in message, message
    assert "HTTP 404 NoSuchBucket" in message
    requests = [r for r in s3.server.requests if r.bucket == bucket]
    assert all(r.status == 404 for r in requests)
    listings = [r for r in requests if r.method == "GET" and not r.key]
    assert len(listings) == (1 if what == "prefix" else 2)
    assert engine.stats.origin_requests["list"] == 1
