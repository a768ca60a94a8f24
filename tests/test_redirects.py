"""HTTP origins behind redirects, as model hubs serve files (a 302 to a CDN).

A redirecting front server on one port answers every request with a 302 to the
range server on another port (another host, as far as HTTP is concerned). Both are
on loopback, where redirects may lead only when the config allows it
(``allow_redirects_to``); the tests of that rule use the default config.
"""

from __future__ import annotations

import http.server
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import RangeHTTPServer, self_signed_cert

from cachefs.errors import VersionChangedError
from cachefs.node.config import load_config
from cachefs.node.engine import Engine

BLOCK = 64 * 1024
LOOPBACK = ["127.0.0.0/8"]


class Redirector:
    """A front server that redirects each request to ``target`` + path, and records
    the Authorization header each request carried. With ``tls`` (cert, key) it speaks
    https."""

    def __init__(
        self, target: str, status: int = 302, tls: tuple[Path, Path] | None = None
    ) -> None:
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
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self._server.server_address[1]}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def redirector(http_origin: RangeHTTPServer) -> Iterator[Redirector]:
    front = Redirector(http_origin.base_url)
    yield front
    front.close()


def make_engine(cache_dir: Path, **settings: Any) -> Engine:
    """An engine with small blocks, every open revalidated; ``settings`` add config keys."""
    base = {"cache_dir": str(cache_dir), "block_size": "64KiB", "revalidate_after": 0}
    return Engine(load_config(overrides={**base, **settings}, environ={}))


@pytest.fixture
def engine(cache_dir: Path) -> Iterator[Engine]:
    """An engine that may follow redirects to loopback, where the test servers are."""
    engine = make_engine(cache_dir, allow_redirects_to=LOOPBACK)
    yield engine
    engine.close()


@pytest.fixture
def strict_engine(cache_dir: Path) -> Iterator[Engine]:
    """An engine with the default config: redirects lead to public addresses only."""
    engine = make_engine(cache_dir)
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
    http_origin: RangeHTTPServer, cache_dir: Path
) -> None:
    """A configured Authorization header goes to the first host only, not the next."""
    http_origin.put("/models/m.bin", b"x" * 100)
    second = Redirector(http_origin.base_url)
    first = Redirector(second.url(""))
    origins = [{"prefix": first.url("/"), "options": {"headers": {"Authorization": "Basic eA=="}}}]
    engine = make_engine(cache_dir, allow_redirects_to=LOOPBACK, origins=origins)
    try:
        assert engine.read(first.url("/models/m.bin")) == b"x" * 100
        assert first.authorizations and all(a == "Basic eA==" for a in first.authorizations)
        assert second.authorizations and not any(second.authorizations)
    finally:
        engine.close()
        first.close()
        second.close()


def test_redirect_loop_is_a_clear_error(strict_engine: Engine) -> None:
    """A server that redirects to itself forever: a clear error, not a hang. Its own
    origin is the one the user named, so the default config follows it."""
    loop = Redirector("")  # Location: the same path, on the same server
    try:
        with pytest.raises(OSError, match="more than 5 redirects"):
            strict_engine.stat(loop.url("/a"))
        assert len(loop.authorizations) == 6
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("target", "fragments"),
    [
        (
            "http://169.254.169.254",
            ("to http://169.254.169.254/latest/meta-data/iam:", "169.254.169.254 is a link-local"),
        ),
        ("http://localhost:{port}", ("localhost resolves to", "a loopback address")),
        ("http://2130706433:{port}", ("2130706433 resolves to 127.0.0.1", "loopback")),
        ("http://[::ffff:127.0.0.1]:{port}", ("(that is 127.0.0.1)", "loopback")),
        ("http://0.0.0.0:{port}", ("0.0.0.0 is a", "unspecified")),
        ("http://10.1.2.3", ("10.1.2.3 is a private", "allow_redirects_to: [10.1.2.3/32]")),
        ("http://192.168.0.1", ("192.168.0.1 is a private",)),
        ("http://[fe80::1]", ("fe80::1 is a link-local", "allow_redirects_to: [fe80::1/128]")),
        ("http://[fd00::1]", ("fd00::1 is a private",)),
        ("http://224.0.0.1", ("224.0.0.1 is a multicast",)),
        ("http://100.100.100.200", ("100.100.100.200 is a non-public",)),
    ],
)
def test_redirects_to_non_public_addresses_are_refused(
    http_origin: RangeHTTPServer, strict_engine: Engine, target: str, fragments: tuple[str, ...]
) -> None:
    """A redirect to the metadata service or the node's own network: a clear error
    that names the target and the key to set, and no request reaches it."""
    http_origin.put("/latest/meta-data/iam", b"m" * 100)
    front = Redirector(target.format(port=http_origin.port))
    try:
        with pytest.raises(PermissionError) as info:
            strict_engine.stat(front.url("/latest/meta-data/iam"))
        message = str(info.value)
        for fragment in (*fragments, "refused to follow a redirect", "allow_redirects_to"):
            assert fragment in message, (fragment, message)
        assert len(front.authorizations) == 1  # refused, not retried
        assert http_origin.requests == []
    finally:
        front.close()


@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("http://user:pw@127.0.0.1:{port}", "credentials in a URL are not accepted"),
        ("http://127.0.0.1:{port}/a/%2e%2e", "'..' is not allowed"),
    ],
)
def test_redirects_to_refused_urls(
    http_origin: RangeHTTPServer, engine: Engine, location: str, fragment: str
) -> None:
    """A Location that is not an http(s) URL cachefs accepts is refused like one a user
    gave, loopback allowed or not; the password in it is never shown."""
    http_origin.put("/m.bin", b"m" * 100)
    front = Redirector(location.format(port=http_origin.port))
    try:
        with pytest.raises(PermissionError) as info:
            engine.stat(front.url("/m.bin"))
        assert fragment in str(info.value) and "pw" not in str(info.value)
        assert http_origin.requests == []
    finally:
        front.close()


def test_loopback_redirects_follow_the_config(
    http_origin: RangeHTTPServer, cache_dir: Path
) -> None:
    """The same redirect to loopback: refused by default, followed once the config (or
    its environment form) lists the network; a network that does not hold it is no use."""
    http_origin.put("/m.bin", b"m" * 100)
    front = Redirector(http_origin.base_url)
    try:
        for settings, environ in (
            ({}, {}),
            ({"allow_redirects_to": ["10.0.0.0/8", "::1/128"]}, {}),
        ):
            config = load_config(
                overrides={"cache_dir": str(cache_dir), **settings}, environ=environ
            )
            engine = Engine(config)
            try:
                with pytest.raises(PermissionError, match="allow_redirects_to"):
                    engine.read(front.url("/m.bin"))
            finally:
                engine.close()
        assert http_origin.requests == []
        for settings, environ in (
            ({"allow_redirects_to": ["127.0.0.1/32"]}, {}),
            ({}, {"CACHEFS_ALLOW_REDIRECTS_TO": "10.0.0.0/8,127.0.0.0/8"}),
        ):
            config = load_config(
                overrides={"cache_dir": str(cache_dir), **settings}, environ=environ
            )
            engine = Engine(config)
            try:
                assert engine.read(front.url("/m.bin")) == b"m" * 100
            finally:
                engine.close()
    finally:
        front.close()


def test_https_redirects_never_downgrade_to_http(
    http_origin: RangeHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https -> http is refused even to an allowed network; https -> https is followed."""
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client's CA store: this cert
    http_origin.put("/m.bin", b"m" * 100)
    downgrade = Redirector(http_origin.base_url, tls=(cert, key))
    secure = Redirector(downgrade.url(""), tls=(cert, key))
    engine = make_engine(tmp_path / "cache", allow_redirects_to=LOOPBACK)
    try:
        for url in (downgrade.url("/m.bin"), secure.url("/m.bin")):
            with pytest.raises(PermissionError) as info:
                engine.stat(url)
            message = str(info.value)
            assert f"redirect from https to {http_origin.url('/m.bin')}" in message, message
            assert "never downgrade to http" in message
        assert len(secure.authorizations) == 1 and len(downgrade.authorizations) == 2
        assert http_origin.requests == []
    finally:
        engine.close()
        downgrade.close()
        secure.close()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("not-a-network", "allow_redirects_to[0] 'not-a-network' is not a network"),
        (["127.0.0.0/8", "10.0.0.1/8"], "allow_redirects_to[1] '10.0.0.1/8'"),
        ({"allow_private": True}, "config key 'allow_redirects_to'"),
    ],
)
def test_bad_allow_redirects_to_names_the_key(value: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(overrides={"allow_redirects_to": value}, environ={})
    assert fragment in str(info.value)


def test_prefix_listings_follow_only_checked_redirects(
    http_origin: RangeHTTPServer, cache_dir: Path
) -> None:
    """A prefix behind a redirect is listed where the checked redirect leads (never
    where an unchecked one would), and its objects are named under the URL asked for."""
    http_origin.put("/models/a.bin", b"a" * 100)
    http_origin.put("/models/sub/b.bin", b"b" * 200)
    front = Redirector(http_origin.base_url)
    strict = make_engine(cache_dir)
    try:
        with pytest.raises(PermissionError, match="allow_redirects_to"):
            strict.prefetch([front.url("/models/")])
        assert http_origin.requests == []
    finally:
        strict.close()
    engine = make_engine(cache_dir, allow_redirects_to=LOOPBACK)
    try:
        assert engine.prefetch([front.url("/models/")]).objects == 2
        assert sorted(o.header.url for o in engine.store.objects()) == [
            front.url("/models/a.bin"),
            front.url("/models/sub/b.bin"),
        ]
    finally:
        engine.close()
        front.close()
