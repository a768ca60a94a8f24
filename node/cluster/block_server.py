"""Blocks for peers over plain HTTP/1.1: the kernel moves them from file to socket.

A block another node asks for is a byte range of this node's data file; gRPC would
hold it in memory and copy it through Python and protobuf several times, so peers
fetch blocks here instead (gRPC stays for control). One request is one block, in the
form ``block_wire`` describes. The bytes go with ``sendfile(2)`` from the data file
(through TLS, when the node has a certificate, Python writes them). Errors carry the
exception's class in ``cachefs-error`` and its message as the body, the same table
as gRPC's (``cachefs.rpc_errors``), so the receiver raises what this node raised. To
the receiver an owner is one more origin: the same ranged-GET client, streamed into
its store, checked against the checksum before it is recorded.

Only the cluster token is accepted here: pods and local processes read through the
gRPC listeners. Connections are kept alive; a thread serves each one.
"""

from __future__ import annotations

import hmac
import http.server
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc

from cachefs.auth import SCHEME
from cachefs.node.callers import Caller
from cachefs.node.cluster.block_wire import CHECKSUM_HEADER, PATH
from cachefs.node.engine import PeerBlock
from cachefs.node.metrics import CallStats
from cachefs.node.origins.ref import ObjectRef
from cachefs.node.service import CacheService
from cachefs.rpc_errors import ERROR_KEY, kind_of, message_of, status_of
from cachefs.urls import parse_url

METHOD = "FetchBlock"  # how calls are counted and logged, as the gRPC methods are
_IDLE_SECONDS = 120  # a kept-alive connection with no request for this long is closed
_MAX_URL = 16 * 1024
log = logging.getLogger("cachefs.peers")

_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 507,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class BadRequest(ValueError):
    """The request is not one block of this node's: answered 400."""


class BlockServer:
    """The peer block endpoint of one node, on its own port."""

    def __init__(
        self,
        address: str,
        service: CacheService,
        token: str,
        calls: CallStats,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``address``: HOST:PORT to bind (port 0: any free one)."""
        host, _, port = address.rpartition(":")
        handler = _handler(service, token.encode(), calls)
        self._server = _Server((host.strip("[]") or "0.0.0.0", int(port)), handler, tls)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cachefs-blocks", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], handler: type[Any], tls: ssl.SSLContext | None
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._tls = tls
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, peer = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:  # the handshake happens in the connection's thread
            conn = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, peer


def _handler(service: CacheService, token: bytes, calls: CallStats) -> type[Any]:
    class Handler(_BlockHandler):
        pass

    Handler.service = service
    Handler.token = token
    Handler.calls = calls
    return Handler


class _BlockHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_SECONDS
    service: CacheService
    token: bytes
    calls: CallStats

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: request lines carry origin URLs; ``do_GET`` logs one line per call."""

    def do_GET(self) -> None:
        started = time.monotonic()
        sent = 0
        try:
            caller = self._caller()
            ref, block_size, index, fill, forwarded = self._request()
            with self.service.block_for_peer(
                caller, ref, block_size, index, fill=fill, forwarded=forwarded
            ) as block:
                if block is None:
                    raise FileNotFoundError(f"block {index} of {ref.canonical} is not cached here")
                sent = self._send(block, ref, index * block_size)
        except _Refused as exc:
            self.calls.record(METHOD, "UNAUTHENTICATED", None)
            log.info("%s refused: %s", METHOD, exc, extra={"method": METHOD})
            self._error(401, "PermissionError", str(exc))
            return
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the peer went away mid-block
            self.calls.record(METHOD, "CANCELLED", None)
            return
        except Exception as exc:
            self._fail(exc)
            return
        self.calls.record(METHOD, "OK", None)
        log.debug(
            "%s OK",
            METHOD,
            extra={"method": METHOD, "code": "OK", "bytes": sent, "ms": _ms(started)},
        )

    def _caller(self) -> Caller:
        presented = self.headers.get("Authorization") or ""
        if not presented.startswith(SCHEME) or presented == SCHEME:
            raise _Refused("no token was presented: peers present the cluster token")
        if not hmac.compare_digest(presented[len(SCHEME) :].encode(), self.token):
            raise _Refused(
                "the token is wrong: set CACHEFS_TOKEN or CACHEFS_TOKEN_FILE to the node's token"
            )
        return Caller("cluster")

    def _request(self) -> tuple[ObjectRef, int, int, bool, bool]:
        """What the request names, every value checked: the block's ref, the block
        size, its index (from the Range), whether to fill it and whether forwarded."""
        if len(self.path) > _MAX_URL:
            raise BadRequest("the request line is too long")
        parts = urlsplit(self.path)
        if parts.path != PATH:
            raise FileNotFoundError(f"no such endpoint: {parts.path} (peers ask {PATH})")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            url = parse_url(query["url"])
            version = query["version"]
            size = _whole(query["size"], "size")
            block_size = _whole(query["block_size"], "block_size")
            fill, forwarded = query.get("fill") == "1", query.get("forwarded") == "1"
        except KeyError as exc:
            raise BadRequest(f"the request lacks {exc.args[0]}") from None
        if block_size <= 0:
            raise BadRequest("block_size must be positive")
        start, end = _range(self.headers.get("Range") or "")
        index, offset = divmod(start, block_size)
        if offset or (start < size and end != min(start + block_size, size)):
            raise BadRequest(
                f"bytes {start}-{end - 1} are not one block of {block_size} bytes: ask for "
                "exactly one block"
            )
        ref = ObjectRef(url, version, size, query.get("etag") or None)
        return ref, block_size, index, fill, forwarded

    def _send(self, block: PeerBlock, ref: ObjectRef, start: int) -> int:
        self.send_response(206)
        self.send_header("Content-Length", str(block.length))
        self.send_header("Content-Range", f"bytes {start}-{start + block.length - 1}/{ref.size}")
        self.send_header(CHECKSUM_HEADER, f"{block.checksum:016x}")
        self.end_headers()
        if block.data is not None:
            self.wfile.write(block.data)
        else:
            self.wfile.flush()
            _send_file(self.connection, block)
        return block.length

    def _fail(self, exc: Exception) -> None:
        kind = kind_of(exc)
        status = 400 if isinstance(exc, BadRequest) else _HTTP_STATUS.get(status_of(exc), 500)
        level = logging.ERROR if kind == "InternalError" else logging.INFO
        log.log(
            level,
            "%s failed: %s",
            METHOD,
            exc,
            exc_info=level == logging.ERROR,
            extra={"method": METHOD, "code": str(status)},
        )
        self.calls.record(METHOD, status_of(exc).name, kind)
        message = message_of(exc)
        if kind == "InternalError":
            message = f"internal error in the node ({type(exc).__name__}: {message}); see its log"
        self._error(status, kind, message)

    def _error(self, status: int, kind: str, message: str) -> None:
        body = message.encode("utf-8", "replace")
        self.send_response(status)
        self.send_header(ERROR_KEY, kind)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Refused(Exception):
    """The request carries no valid cluster token."""


def _send_file(conn: socket.socket, block: PeerBlock) -> None:
    """``block``'s range of its data file into ``conn``: ``sendfile(2)`` on a plain
    socket (no byte enters this process), Python's writes through TLS."""
    assert block.fd is not None
    with os.fdopen(block.fd, "rb", closefd=False) as file:
        sent = conn.sendfile(file, block.offset, block.length)
    if sent != block.length:
        raise ConnectionResetError(f"sent {sent} of the block's {block.length} bytes")


def _whole(text: str, name: str) -> int:
    if not text.isdigit() or len(text) > 20:
        raise BadRequest(f"{name} must be a whole number, not {text[:40]!r}")
    return int(text)


def _range(header: str) -> tuple[int, int]:
    """``bytes=A-B`` as [A, B + 1)."""
    unit, _, span = header.partition("=")
    first, dash, last = span.partition("-")
    if unit.strip() != "bytes" or not dash or not first.isdigit() or not last.isdigit():
        raise BadRequest(f"a Range of one block is needed (bytes=START-END), not {header[:60]!r}")
    start, end = int(first), int(last) + 1
    if end <= start:
        raise BadRequest(f"an empty Range: {header[:60]!r}")
    return start, end


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
