"""Ranged HTTP GETs streamed to a sink, with per-thread keep-alive connections.

This is the data path for S3 (through presigned URLs) and plain HTTP origins: each
worker thread owns its connections, reads a block's body with ``readinto`` into a
small preallocated buffer (the socket read releases the GIL), hands each chunk to
the sink, and reuses the connection for the next block. URLs passed here may be
signed: messages use ``label`` only.
"""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
import threading
from base64 import b64encode
from dataclasses import dataclass
from email.message import Message
from urllib.parse import unquote, urljoin, urlsplit

from cachefs.errors import TransientOriginError
from cachefs.node.origins.errors import error_for_status
from cachefs.node.sinks import Sink

_ERROR_BODY_LIMIT = 64 * 1024
MAX_REDIRECTS = 5
CHUNK_SIZE = 1024 * 1024  # what one socket read may bring at most
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Answer:
    """Status and headers of an origin's answer (lower-case header names)."""

    status: int
    headers: dict[str, str]


class RangedHTTPClient:
    def __init__(self, timeout: float = 60.0) -> None:
        self._timeout = timeout
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None  # made on first https use: loading CAs is slow

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str], http.client.HTTPConnection] = (
            getattr(self._local, "pool", None) or {}
        )
        self._local.pool = pool
        conn = pool.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                conn = http.client.HTTPSConnection(netloc, timeout=self._timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self._timeout)
            pool[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = getattr(self._local, "pool", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _send(
        self, method: str, url: str, headers: dict[str, str], label: str
    ) -> tuple[http.client.HTTPResponse, tuple[str, str]]:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc.rpartition("@")[2])  # userinfo is not the host
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if parts.username is not None and "Authorization" not in headers:
            headers = {**headers, "Authorization": basic_auth(parts.username, parts.password)}
        for attempt in range(2):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection(*key)
            try:
                conn.request(method, target, headers=headers)
                return conn.getresponse(), key
            except (OSError, http.client.HTTPException) as exc:
                self._drop(*key)
                stale = isinstance(
                    exc, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError
                )
                if attempt == 0 and stale:
                    continue
                reason = (
                    "cannot resolve its host name"
                    if isinstance(exc, socket.gaierror)
                    else type(exc).__name__
                )
                raise TransientOriginError(
                    f"{label}: connection to the origin failed ({reason})"
                ) from None
        raise AssertionError("unreachable")

    def _request(
        self, method: str, url: str, headers: dict[str, str], label: str
    ) -> tuple[http.client.HTTPResponse, tuple[str, str]]:
        """Send, following redirects (e.g. a model hub's redirect to its CDN).

        A redirect that only appends "/" is not followed: it says the URL is a
        directory. Credentials are not sent on to another host.
        """
        for _hop in range(MAX_REDIRECTS + 1):
            response, key = self._send(method, url, headers, label)
            location = response.getheader("location")
            if response.status not in _REDIRECTS or not location:
                return response, key
            target = urljoin(url, location)
            if _adds_slash(url, target):
                return response, key
            _read_quietly(response)
            if response.will_close or not response.isclosed():
                self._drop(*key)
            if _host(target) != _host(url):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise OSError(errno.EIO, f"{label}: more than {MAX_REDIRECTS} redirects")

    def head(self, url: str, label: str, headers: dict[str, str] | None = None) -> Answer:
        response, key = self._request("HEAD", url, dict(headers or {}), label)
        try:
            response.read()
        except (OSError, http.client.HTTPException):
            self._drop(*key)
        answer = Answer(response.status, _lower(response.msg))
        if response.will_close:
            self._drop(*key)
        return answer

    def get_range(
        self,
        url: str,
        start: int,
        end: int,
        sink: Sink,
        label: str,
        headers: dict[str, str] | None = None,
        pinned: str = "",
    ) -> Answer:
        """GET bytes [start, end) of ``url``, handing the body to ``sink`` as it arrives.

        The body goes through a small per-thread buffer, so each chunk is still in
        the CPU cache when the sink writes it out.
        """
        request_headers = {"Range": f"bytes={start}-{end - 1}", **(headers or {})}
        response, key = self._request("GET", url, request_headers, label)
        answer = Answer(response.status, _lower(response.msg))
        if response.status >= 300:
            body = _read_quietly(response)
            self._drop(*key)
            raise error_for_status(response.status, label, body, pinned)
        try:
            _check_range(answer, start, end, label)
        except OSError:
            self._drop(*key)
            raise
        chunk = self._chunk_buffer()
        want = end - start
        done = 0
        while done < want:
            try:
                got = response.readinto(chunk[: min(len(chunk), want - done)])
            except (OSError, http.client.HTTPException) as exc:
                self._drop(*key)
                raise TransientOriginError(
                    f"{label}: reading from the origin failed ({type(exc).__name__})"
                ) from None
            if not got:
                break
            try:
                sink.write(chunk[:got])
            except BaseException:
                self._drop(*key)  # the rest of the body is unread
                raise
            done += got
        if done != want:
            self._drop(*key)
            raise TransientOriginError(
                f"{label}: the origin closed the connection after {done} of {want} bytes"
            )
        if response.will_close or not response.isclosed():
            # A close, or a body longer than asked for: start the next request afresh.
            self._drop(*key)
        return answer

    def _chunk_buffer(self) -> memoryview:
        buffer = getattr(self._local, "chunk", None)
        if buffer is None:
            buffer = self._local.chunk = memoryview(bytearray(CHUNK_SIZE))
        return buffer


def _host(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2].lower()


def _adds_slash(url: str, target: str) -> bool:
    before, after = urlsplit(url), urlsplit(target)
    return _host(url) == _host(target) and after.path == before.path.rstrip("/") + "/"


def basic_auth(username: str, password: str | None) -> str:
    """The Authorization header value for a URL's (percent-encoded) userinfo."""
    userinfo = f"{unquote(username)}:{unquote(password or '')}"
    return "Basic " + b64encode(userinfo.encode()).decode()


def _read_quietly(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read(_ERROR_BODY_LIMIT)
    except (OSError, http.client.HTTPException):
        return b""


def _lower(message: Message) -> dict[str, str]:
    return {k.lower(): v for k, v in message.items()}


def _check_range(answer: Answer, start: int, end: int, label: str) -> None:
    """Accept 206, or 200 with a matching Content-Range, or 200 for a whole-object read."""
    content_range = answer.headers.get("content-range", "")
    if content_range:
        expected = f"bytes {start}-{end - 1}/"
        if not content_range.startswith(expected):
            raise OSError(
                f"{label}: the origin answered bytes {content_range!r} to a request for "
                f"{start}-{end - 1}"
            )
        return
    length = answer.headers.get("content-length")
    if answer.status == 200 and start == 0 and length is not None and int(length) == end:
        return
    raise OSError(
        f"{label}: the origin ignored the Range request (HTTP {answer.status}); "
        "cachefs needs an origin that serves byte ranges"
    )
