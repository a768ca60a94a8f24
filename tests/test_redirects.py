"""HTTP origins behind redirects, as model hubs serve files (a 302 to a CDN).

A redirecting front server on one port answers every request with a 302 to the
range server on another port (another host, as far as HTTP is concerned).
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import RangeHTTPServer

from cachefs.errors import VersionChangedError
from cachefs.node.config import load_config
from cachefs.node.engine import Engine

BLOCK = 64 * 1024


class Redirector:
    """A front server that redirects each request to ``target`` + path, and records
    the Authorization header each request carried."""

    def __init__(self, target: str, status: int = 302) -> None:
        self.authorizations: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _redirect(self) -> None:
                owner.authorizations.append(self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Location", target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _redirect

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def redirector(http_origin: RangeHTTPServer) -> Iterator[Redirector]:
    front = Redirector(http_origin.base_url)
    yield front
    front.close()


@pytest.fixture
def engine(cache_dir: Path) -> Iterator[Engine]:
    settings = {"cache_dir": str(cache_dir), "block_size": "64KiB", "revalidate_after": 0}
    engine = Engine(load_config(overrides=settings, environ={}))
    yield engine
    engine.close()


def test_reads_follow_redirects(
    http_origin: RangeHTTPServer, redirector: Redirector, engine: Engine
) -> None:
    """Stat and every ranged GET follow the 302; bytes equal the target's."""
    data = os.urandom(3 * BLOCK + 17)
    http_origin.put("/models/m.bin", data)
    url = redirector.url("/models/m.bin")
    assert engine.read(url) == data
    assert engine.read(url, BLOCK - 5, 10) == data[BLOCK - 5 : BLOCK + 5]
    assert len(http_origin.gets("/models/m.bin")) == 4  # one GET per block, no more
    assert engine.stat(url).canonical == url  # the key names the URL asked for


def test_redirected_reads_stay_pinned(
    http_origin: RangeHTTPServer, redirector: Redirector, engine: Engine
) -> None:
    """An overwrite behind the redirect is caught: the target's ETag is the version."""
    http_origin.put("/models/m.bin", b"a" * (2 * BLOCK))
    url = redirector.url("/models/m.bin")
    ref = engine.stat(url)
    assert engine.read_ref(ref, 0, 10) == b"a" * 10
    http_origin.put("/models/m.bin", b"b" * (2 * BLOCK))
    with pytest.raises(VersionChangedError):
        engine.read_ref(ref, BLOCK, BLOCK + 10)
    assert engine.read(url, BLOCK, 10) == b"b" * 10


def test_credentials_are_not_sent_to_another_host(
    http_origin: RangeHTTPServer, engine: Engine
) -> None:
    """Userinfo authorises the first host only; the host it redirects to gets none."""
    http_origin.put("/models/m.bin", b"x" * 100)
    second = Redirector(http_origin.base_url)
    first = Redirector(second.url(""))
    try:
        url = first.url("/models/m.bin").replace("http://", "http://user:s3cret@")
        assert engine.read(url) == b"x" * 100
        assert first.authorizations and all(first.authorizations)
        assert second.authorizations and not any(second.authorizations)
    finally:
        first.close()
        second.close()


def test_redirect_loop_is_a_clear_error(engine: Engine) -> None:
    """A server that redirects to itself forever: a clear error, not a hang."""
    loop = Redirector("")  # Location: the same path, on the same server
    try:
        with pytest.raises(OSError, match="redirects"):
            engine.stat(loop.url("/a"))
    finally:
        loop.close()
