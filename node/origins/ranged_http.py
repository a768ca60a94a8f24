"""Ranged HTTP GETs streamed to a sink, with per-thread keep-alive connections.

This is the data path for S3 (through presigned URLs) and plain HTTP origins: each
worker thread owns its connections, reads a block's body with ``readinto`` into a
small preallocated buffer (the socket read releases the GIL), hands each chunk to
the sink, and reuses the connection for the next block. URLs passed here may be
signed: messages use ``label`` only.

Redirects are followed (a model hub's to its CDN), but only to the same scheme or to
https, and, beyond the origin the user named, only to hosts whose every address is
public (``allow_redirects_to`` in the config names the networks that may be reached
too): an origin cannot send cachefs into the node's own network. The connection goes
to the addresses that were checked, so a second DNS answer cannot swap in another.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urljoin, urlsplit

from cachefs.errors import TransientOriginError
from cachefs.node.origins.deadlines import Deadlines
from cachefs.node.origins.errors import error_for_status
from cachefs.node.sinks import Sink
from cachefs.urls import HTTP_PROTOCOLS, parse_url, redact

_ERROR_BODY_LIMIT = 64 * 1024
MAX_REDIRECTS = 5
CHUNK_SIZE = 512 * 1024  # what one socket read may bring at most: the chunk is
# hashed and written while it is still in the CPU cache (1 MiB measured slower when
# other processes share the CPU; alike on a quiet one: bench/RESULTS.md)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PORTS = {"http": 80, "https": 443}
# Headers that authorise a request: never sent on to another host.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A connection's pool key: scheme, host[:port], and the addresses it may connect to
# (empty: whatever the host name resolves to, for the origin the user named).
_Key = tuple[str, str, tuple[str, ...]]


@dataclass(frozen=True)
class Answer:
    """Status and headers of an origin's answer (lower-case header names), and for a
    HEAD the redirects followed to it (a model hub names a file's digest in its own)."""

    status: int
    headers: dict[str, str]
    redirects: tuple[Answer, ...] = ()


class RangedHTTPClient:
    def __init__(
        self,
        timeout: float = 60.0,
        allow_redirects_to: Sequence[Network] = (),
        min_rate: float = 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``allow_redirects_to``: non-public networks redirects may lead to all the same.
        ``min_rate``: bytes per second a body must keep up (after ``timeout`` of grace).
        ``ssl_context``: whom https trusts (default: the system's CAs)."""
        self._timeout = timeout
        self._min_rate = min_rate
        self._deadlines = Deadlines()
        self._allow_redirects_to = tuple(allow_redirects_to)
        self._local = threading.local()
        # Made on first https use (loading the system's CAs is slow).
        self._ssl: ssl.SSLContext | None = ssl_context

    def _connection(self, key: _Key) -> http.client.HTTPConnection:
        pool: dict[_Key, http.client.HTTPConnection] = getattr(self._local, "pool", None) or {}
        self._local.pool = pool
        conn = pool.get(key)
        if conn is None:
            scheme, netloc, addresses = key
            if scheme == "https":
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                conn = http.client.HTTPSConnection(netloc, timeout=self._timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self._timeout)
            if addresses:  # http.client's own hook; TLS still checks the host name
                conn._create_connection = _connector(addresses)  # type: ignore[attr-defined]
            pool[key] = conn
        return conn

    def _drop(self, key: _Key) -> None:
        conn = getattr(self._local, "pool", {}).pop(key, None)
        if conn is not None:
            conn.close()

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        label: str,
        addresses: tuple[str, ...] = (),
    ) -> tuple[http.client.HTTPResponse, _Key]:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, addresses)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for attempt in range(2):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection(key)
            try:
                conn.request(method, target, headers=headers)
                return conn.getresponse(), key
            except (OSError, http.client.HTTPException) as exc:
                self._drop(key)
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
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        label: str,
        add_slash: bool = False,
        hops: list[Answer] | None = None,
    ) -> tuple[http.client.HTTPResponse, _Key, str]:
        """Send, following redirects (e.g. a model hub's redirect to its CDN); the
        answer, its connection's key and the URL that gave it. ``hops`` collects the
        redirect answers.

        A redirect that only appends "/" is followed only with ``add_slash``: it says
        the URL is a directory. Credentials are not sent on to another host.
        """
        first = _origin(url)
        addresses: tuple[str, ...] = ()
        for _hop in range(MAX_REDIRECTS + 1):
            response, key = self._send(method, url, headers, label, addresses)
            location = response.getheader("location")
            if response.status not in _REDIRECTS or not location:
                return response, key, url
            target = urljoin(url, location)
            if _adds_slash(url, target) and not add_slash:
                return response, key, url
            if hops is not None:
                hops.append(Answer(response.status, _lower(response.msg)))
            _read_quietly(response)
            if response.will_close or not response.isclosed():
                self._drop(key)
            target, addresses = self._redirect(url, target, first, label)
            if _host(target) != _host(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
            url = target
        raise OSError(errno.EIO, f"{label}: more than {MAX_REDIRECTS} redirects")

    def _redirect(
        self, url: str, target: str, first: tuple[str, str, int], label: str
    ) -> tuple[str, tuple[str, ...]]:
        """Where a redirect from ``url`` to ``target`` goes, if it may be followed: the
        URL to ask and the addresses to connect to (none for the user's own origin).

        PermissionError names the target (without its query) and what to change.
        """
        shown = redact(target)
        try:
            parsed = parse_url(target)
        except ValueError as exc:
            raise PermissionError(
                errno.EACCES, f"{label}: refused to follow a redirect: {exc}"
            ) from None
        if parsed.protocol not in HTTP_PROTOCOLS:
            raise PermissionError(
                errno.EACCES,
                f"{label}: refused to follow a redirect to {shown}: only http and https "
                "redirects are followed",
            )
        scheme = urlsplit(url).scheme
        if parsed.protocol not in (scheme, "https"):
            raise PermissionError(
                errno.EACCES,
                f"{label}: refused to follow a redirect from {scheme} to {shown}: a redirect "
                "may keep its scheme or move to https, never downgrade to http",
            )
        fetch = parsed.fetch_url
        if _origin(fetch) == first:
            return fetch, ()
        return fetch, self._public_addresses(fetch, shown, label)

    def _public_addresses(self, url: str, shown: str, label: str) -> tuple[str, ...]:
        """Every address ``url``'s host resolves to, each public or allowed by config."""
        _scheme, host, port = _origin(url)
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise TransientOriginError(
                f"{label}: the redirect target {shown} cannot be resolved"
            ) from None
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in found))
        for address in addresses:
            refused = _refused(address, self._allow_redirects_to)
            if refused is not None:
                kind, ip = refused
                seen = address if str(ip) == address else f"{address} (that is {ip})"
                said = f"{host} is" if host == address else f"{host} resolves to {seen},"
                raise PermissionError(
                    errno.EACCES,
                    f"{label}: refused to follow a redirect to {shown}: {said} a {kind} "
                    "address; redirects lead only to public addresses "
                    "unless the config's allow_redirects_to lists the network "
                    f"(e.g. allow_redirects_to: [{ipaddress.ip_network(ip)}])",
                )
        return addresses

    def head(self, url: str, label: str, headers: dict[str, str] | None = None) -> Answer:
        hops: list[Answer] = []
        response, key, _url = self._request("HEAD", url, dict(headers or {}), label, hops=hops)
        try:
            response.read()
        except (OSError, http.client.HTTPException):
            self._drop(key)
        answer = Answer(response.status, _lower(response.msg), tuple(hops))
        if response.will_close:
            self._drop(key)
        return answer

    def locate(self, url: str, label: str, headers: dict[str, str] | None = None) -> str:
        """The URL that ``url``'s redirects (the checked ones) lead to: a listing reads
        that one with redirects off, so nothing unchecked is followed."""
        response, key, final = self._request(
            "HEAD", url, dict(headers or {}), label, add_slash=True
        )
        _read_quietly(response)
        if response.will_close or not response.isclosed():
            self._drop(key)
        return final

    def get_range(
        self,
        url: str,
        start: int,
        end: int,
        sink: Sink,
        label: str,
        headers: dict[str, str] | None = None,
        pinned: str = "",
        errors: Callable[[int, dict[str, str], bytes], Exception] | None = None,
    ) -> Answer:
        """GET bytes [start, end) of ``url``, handing the body to ``sink`` as it arrives.
        ``errors`` makes the exception for an answer of 300 or more (status, headers,
        body), in place of the origins' table.

        The body goes through a small per-thread buffer, so each chunk is still in
        the CPU cache when the sink writes it out. The whole range has a deadline:
        ``timeout`` plus its size at ``min_rate``; a body that drips slower is
        abandoned (a transient error: it is retried on a new connection).
        """
        deadline = time.monotonic() + self._timeout + (end - start) / self._min_rate
        request_headers = {"Range": f"bytes={start}-{end - 1}", **(headers or {})}
        response, key, _url = self._request("GET", url, request_headers, label)
        answer = Answer(response.status, _lower(response.msg))
        if response.status >= 300:
            body = _read_quietly(response)
            if response.will_close or not response.isclosed():
                self._drop(key)  # closing, or a body longer than we read: start afresh
            if errors is not None:
                raise errors(response.status, answer.headers, body)
            raise error_for_status(response.status, label, body, pinned, answer.headers)
        try:
            _check_range(answer, start, end, label)
        except OSError:
            self._drop(key)
            raise
        chunk = self._chunk_buffer()
        want = end - start
        done = 0
        with self._deadlines.watch(self._connection(key).sock, deadline) as watch:
            while done < want:
                try:
                    got = response.readinto(chunk[: min(len(chunk), want - done)])
                except (OSError, http.client.HTTPException) as exc:
                    self._drop(key)
                    if watch.expired:
                        break
                    raise TransientOriginError(
                        f"{label}: reading from the origin failed ({type(exc).__name__})"
                    ) from None
                if not got:
                    break
                try:
                    sink.write(chunk[:got])
                except BaseException:
                    self._drop(key)  # the rest of the body is unread
                    raise
                done += got
        if done != want:
            self._drop(key)
            if watch.expired:
                raise TransientOriginError(
                    f"{label}: the origin sent {done} of {want} bytes too slowly (below "
                    f"retry.min_rate, {self._min_rate:.0f} bytes/s); abandoned, to retry"
                )
            raise TransientOriginError(
                f"{label}: the origin closed the connection after {done} of {want} bytes"
            )
        if watch.expired or response.will_close or not response.isclosed():
            # Shut down at the deadline, a close, or a body longer than asked for:
            # start the next request afresh.
            self._drop(key)
        return answer

    def _chunk_buffer(self) -> memoryview:
        buffer = getattr(self._local, "chunk", None)
        if buffer is None:
            buffer = self._local.chunk = memoryview(bytearray(CHUNK_SIZE))
        return buffer


def _host(url: str) -> str:
    return urlsplit(url).netloc.lower()


def _origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port: what a redirect must keep to stay with the user's origin."""
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port or _PORTS.get(parts.scheme, 0)


def _refused(
    address: str, allowed: Sequence[Network]
) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """(kind, address) when ``address`` is not public and no allowed network holds it.

    An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) is judged by that
    one too: ``::ffff:127.0.0.1`` is loopback.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # no IPv6 zone
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            candidates = [ip.ipv4_mapped]
        elif ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        elif ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for candidate in candidates:
        if any(candidate in network for network in allowed):
            continue
        kind = _kind(candidate)
        if kind is not None:
            return kind, candidate
    return None


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The kind of a non-public address (None for a public one)."""
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("non-public", not ip.is_global),
    ):
        if flag:
            return kind
    return None


def _connector(addresses: tuple[str, ...]) -> Callable[..., socket.socket]:
    """``socket.create_connection`` to ``addresses`` only, the ones a redirect check saw."""

    def create(
        address: tuple[str, int], timeout: Any = None, source_address: Any = None
    ) -> socket.socket:
        error: OSError = OSError(errno.EHOSTUNREACH, "no address to connect to")
        for ip in addresses:
            try:
                return socket.create_connection((ip, address[1]), timeout, source_address)
            except OSError as exc:
                error = exc
        raise error

    return create


def _adds_slash(url: str, target: str) -> bool:
    before, after = urlsplit(url), urlsplit(target)
    return _host(url) == _host(target) and after.path == before.path.rstrip("/") + "/"


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
