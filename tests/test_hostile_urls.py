"""Hostile URLs at every entry point, each with one exact outcome.

Every entry of ``TABLE`` is either refused (a ValueError whose message holds a given
fragment: it says what was wrong and what to write instead) or accepted as one
canonical URL, and the outcome is the same through the CLI (a child process), the
fsspec filesystem, a real ``cachefs node`` over gRPC (its client and a raw stub, so
the client's own checks cannot hide the node's) and a real ``cachefs csi`` plugin
driven through its socket. A refused URL sends no request to any origin; an accepted
one reaches the origin in its normal form only.

``{o}`` is the HTTP origin (``http://127.0.0.1:PORT``), whose ``/org/`` is the prefix
CSI volumes may name; ``/private/x.bin`` next to it is what the attacks aim at.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
import grpc
import pytest
from conftest import mounts_under
from servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, RangeHTTPServer, S3Bucket, wait_for

from cachefs.client import NodeClient
from cachefs.csi.proto import csi_pb2 as csi
from cachefs.csi.proto import csi_pb2_grpc as csi_grpc
from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import cachefs_pb2_grpc as pb_grpc
from cachefs.urls import parse_url

DATA = b"weights " * 512
SECRET = b"private " * 64
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Entry:
    """A URL template and its one outcome: ``refused`` (a message fragment) or
    ``canonical`` (the URL it is accepted as)."""

    url: str
    refused: str = ""
    canonical: str = ""
    argv: bool = True  # False: a process argument cannot carry it (a NUL byte)


def refused(url: str, fragment: str, argv: bool = True) -> Entry:
    return Entry(url, refused=fragment, argv=argv)


def accepted(url: str, canonical: str) -> Entry:
    return Entry(url, canonical=canonical)


DOTDOT = "'..' is not allowed"
DOT = "'.' is not allowed"
SLASH = "an encoded '/' (%2F)"
BACKSLASH = "'\\' (raw or encoded as %5C)"
USERINFO = "credentials in a URL are not accepted"

TABLE = [
    # The issue's examples, with https://h/org/ allowed, and on the real origin.
    refused("https://h/org/%2e%2e/private/x", DOTDOT),
    refused("https://h/org/..%2fprivate/x", SLASH),
    refused("{o}/org/%2e%2e/private/x.bin", DOTDOT),
    refused("{o}/org/..%2fprivate/x.bin", SLASH),
    # Dot segments in every spelling, in the middle and at the end.
    refused("{o}/org/../private/x.bin", DOTDOT),
    refused("{o}/org/%2E%2E/private/x.bin", DOTDOT),
    refused("{o}/org/.%2e/private/x.bin", DOTDOT),
    refused("{o}/org/%2e./private/x.bin", DOTDOT),
    refused("{o}/org/%252e%252e/private/x.bin", "'%252e%252e' stands for '..'"),
    refused("{o}/org/%25252e%25252E/private/x.bin", "stands for '..'"),
    refused("{o}/org/x/..", DOTDOT),
    refused("{o}/org/x/%2e%2e", DOTDOT),
    refused("{o}/org/./x.bin", DOT),
    refused("{o}/org/x/%2E", DOT),
    refused("{o}/org/..;/private/x.bin", "'..;' stands for '..'"),
    refused("{o}/org/%ef%bc%8e%ef%bc%8e/private/x.bin", "stands for '..'"),
    refused("{o}/org/%e2%80%a4%e2%80%a4/private/x.bin", "stands for '..'"),
    # Separators that are not "/".
    refused("{o}/org/a%2Fb.bin", SLASH),
    refused("{o}/org/a%252fb.bin", SLASH),
    refused("{o}/org/x%252f..%252f..%252fprivate%252fx.bin", SLASH),
    refused("{o}/org/..%5cprivate/x.bin", BACKSLASH),
    refused("{o}/org/..\\private/x.bin", BACKSLASH),
    refused("{o}/org/%255c..%255cprivate/x.bin", BACKSLASH),
    # NUL and control characters, raw and encoded.
    refused("{o}/org/x\x00.bin", "URL contains a NUL byte", argv=False),
    refused("{o}/org/x%00.bin", "encodes a NUL byte"),
    refused("{o}/org/x\r\nHost: evil.bin", "URL contains a control character (U+000D)"),
    refused("{o}/org/x%0d%0aHost:%20evil.bin", "encodes a control character (U+000D)"),
    refused("{o}/org/x\t.bin", "URL contains a control character (U+0009)"),
    refused("{o}/org/x%1b.bin", "encodes a control character (U+001B)"),
    refused("{o}/org/x%7F.bin", "encodes a control character (U+007F)"),
    refused("{o}/org/x%c2%85.bin", "encodes a control character (U+0085)"),
    refused("{o}/org/x%2500.bin", "encodes a NUL byte"),
    refused("{o}/org/model.bin?a=%00", "the query string of"),
    # Userinfo, and authorities that hide the host.
    refused("http://user:pw@127.0.0.1:{port}/org/model.bin", USERINFO),
    refused("http://user@127.0.0.1:{port}/org/model.bin", USERINFO),
    refused("http://@127.0.0.1:{port}/org/model.bin", USERINFO),
    refused("http://127.0.0.1:{port}@127.0.0.1:{port}/org/model.bin", USERINFO),
    refused("http://127.0.0.1%2e:{port}/org/model.bin", "the host holds a percent-escape"),
    refused("http://[::1/org/model.bin", "Invalid IPv6 URL"),
    refused("http://127.0.0.1:99999/org/model.bin", "bad port"),
    # Escapes that are not escapes, or not UTF-8.
    refused("{o}/org/x%zz.bin", "malformed percent-escape '%zz'"),
    refused("{o}/org/x%2.bin", "malformed percent-escape '%2.'"),
    refused("{o}/org/%u002e%u002e/private/x.bin", "malformed percent-escape '%u0'"),
    refused("{o}/org/%c0%ae%c0%ae/private/x.bin", "not UTF-8"),
    # Every other scheme.
    refused("s3://{bucket}/org/%2e%2e/private/x.bin", DOTDOT),
    refused("s3://{bucket}/org/..%2Fprivate/x.bin", SLASH),
    refused("s3://{key}:{secret}@{bucket}/org/model.bin", USERINFO),
    refused("s3://{bucket}/org/..\\private/x.bin", BACKSLASH),
    refused("file://{tmp}/org/%2e%2e/private/x.bin", DOTDOT),
    refused("file://{tmp}/org/..%2F..%2Fprivate/x.bin", SLASH),
    refused("memory:///org/%2E%2E/private/x.bin", DOTDOT),
    refused("gs://bucket/org/%5c..%5cprivate", BACKSLASH),
    refused("hf://org/repo/%2e%2e/private/x.bin", DOTDOT),
    # Accepted: one canonical URL each, which is also what the origin is asked for.
    accepted("{o}/org/model.bin", "{o}/org/model.bin"),
    accepted("{o}/org/%6D%6f%64%65%6C.bin", "{o}/org/model.bin"),
    accepted("HTTP://127.0.0.1.:{port}/org/model.bin", "{o}/org/model.bin"),
    accepted("{o}/org/model.bin?X-Amz-Signature=sig0&X-Amz-Credential=cred0", "{o}/org/model.bin"),
    accepted("{o}/org/%7emodel.bin", "{o}/org/~model.bin"),
    accepted("{o}/org/a%3ab.bin", "{o}/org/a%3Ab.bin"),
    accepted("{o}/org/my model.bin", "{o}/org/my%20model.bin"),
    accepted("{o}/org/mod%c3%a8le.bin", "{o}/org/mod%C3%A8le.bin"),
    accepted("{o}/org/modèle.bin", "{o}/org/mod%C3%A8le.bin"),
    accepted("{o}/org/..model.bin", "{o}/org/..model.bin"),
    accepted("s3://{bucket}/org/%7emodel.bin", "s3://{bucket}/org/%7emodel.bin"),
]
REFUSED = [e for e in TABLE if e.refused]
ACCEPTED = [e for e in TABLE if e.canonical]


@dataclass
class World:
    """The origins, holding every accepted object and the private one."""

    http: RangeHTTPServer
    s3: S3Bucket
    tmp: Path

    def fill(self, entry: Entry) -> str:
        """``entry``'s URL template made real."""
        return entry.url.format(**self._values())

    def canonical(self, entry: Entry) -> str:
        return entry.canonical.format(**self._values())

    def _values(self) -> dict[str, str]:
        return {
            "o": self.http.base_url,
            "port": str(self.http.port),
            "bucket": self.s3.name,
            "tmp": str(self.tmp),
            "key": TEST_ACCESS_KEY,
            "secret": TEST_SECRET_KEY,
        }

    def allowed_prefixes(self) -> tuple[str, ...]:
        """What CSI volumes may name: ``/org/`` of each origin."""
        return (
            f"{self.http.base_url}/org/",
            "https://h/org/",
            f"s3://{self.s3.name}/org/",
            f"file://{self.tmp}/org/",
            "memory:///org/",
        )

    def assert_only_accepted_reached(self) -> None:
        """No request for a refused URL reached an origin; accepted ones arrived in
        their normal form (an HTTP request target is the canonical path)."""
        canonical = [urlsplit(self.canonical(e)) for e in ACCEPTED]
        http_paths = {p.path for p in canonical if p.scheme == "http"}
        for record in self.http.requests:
            assert record.target.split("?")[0] in http_paths, record
        s3_keys = {unquote(p.path).lstrip("/") for p in canonical if p.scheme == "s3"}
        s3_keys |= {p.path.lstrip("/") for p in canonical if p.scheme == "s3"}
        for record in self.s3.requests:
            assert record.key in s3_keys, record


@pytest.fixture
def world(http_origin: RangeHTTPServer, s3: S3Bucket, tmp_path: Path) -> World:
    tmp = tmp_path / "files"
    built = World(http_origin, s3, tmp)
    for entry in ACCEPTED:
        parts = urlsplit(built.canonical(entry))
        if parts.scheme == "http":
            http_origin.put(unquote(parts.path), DATA)
        else:
            s3.put(parts.path.lstrip("/"), DATA)
    http_origin.put("/private/x.bin", SECRET)
    s3.put("private/x.bin", SECRET)
    (tmp / "org").mkdir(parents=True)
    (tmp / "private").mkdir()
    (tmp / "private" / "x.bin").write_bytes(SECRET)
    return built


def check_all(world: World, check: Callable[[Entry, str], str | None]) -> None:
    """Run ``check(entry, url)`` over the table; fail once, listing every mismatch."""
    problems = [f"{e.url!r}: {p}" for e in TABLE if (p := check(e, world.fill(e)))]
    assert not problems, "\n".join(problems)
    world.assert_only_accepted_reached()


def error_mismatch(entry: Entry, exc: BaseException | None) -> str | None:
    """What is wrong with ``exc`` as the refusal of ``entry`` (None: nothing)."""
    if exc is None:
        return "accepted, should be refused"
    if not isinstance(exc, ValueError) or entry.refused not in str(exc):
        return f"{type(exc).__name__}: {exc} (want ValueError with {entry.refused!r})"
    return None


def outcome(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return call(), None
    except Exception as exc:
        return None, exc


# ------------------------------------------------------------------------ parse


@pytest.mark.parametrize("entry", TABLE, ids=lambda e: repr(e.url)[1:-1])
def test_the_normal_form(entry: Entry) -> None:
    """Each entry on its own, through ``parse_url`` (ports and names need no origin)."""
    values = {"o": "http://127.0.0.1:8080", "port": "8080", "bucket": "b", "tmp": "/srv"}
    values |= {"key": TEST_ACCESS_KEY, "secret": TEST_SECRET_KEY}
    url = entry.url.format(**values)
    if entry.refused:
        with pytest.raises(ValueError) as info:
            parse_url(url)
        assert entry.refused in str(info.value)
        assert TEST_SECRET_KEY not in str(info.value) and "pw" not in str(info.value)
    else:
        assert parse_url(url).canonical == entry.canonical.format(**values)
        assert parse_url(parse_url(url).canonical).canonical == parse_url(url).canonical


def test_the_table_covers_what_the_issue_asks() -> None:
    assert len(TABLE) >= 40
    assert {e.url for e in REFUSED} >= {
        "https://h/org/%2e%2e/private/x",
        "https://h/org/..%2fprivate/x",
    }


# -------------------------------------------------------------------------- CLI


def test_cli(world: World, tmp_path: Path) -> None:
    """``cachefs prefetch URL`` in a child: exit 1 with one ``cachefs: error:`` line,
    or exit 0 with the object listed under its canonical URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    cli = [sys.executable, "-m", "cachefs.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)

    def check(entry: Entry, url: str) -> str | None:
        if not entry.argv:
            return None
        cache = str(tmp_path / "caches" / str(TABLE.index(entry)))
        result = run("--cache-dir", cache, "prefetch", url)
        lines = result.stderr.splitlines()
        if entry.refused:
            if result.returncode != 1 or len(lines) != 1:
                return f"exit {result.returncode}, stderr {result.stderr!r}"
            if not lines[0].startswith("cachefs: error: ") or entry.refused not in lines[0]:
                return f"stderr {lines[0]!r}"
            return None
        if result.returncode != 0:
            return f"refused: {result.stderr!r}"
        listed = run("--cache-dir", cache, "ls", "--json")
        urls = [line for line in listed.stdout.splitlines() if line.strip()]
        want = world.canonical(entry)
        return None if len(urls) == 1 and f'"url": "{want}"' in urls[0] else f"ls: {urls}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(TABLE, pool.map(lambda e: check(e, world.fill(e)), TABLE), strict=True))
    check_all(world, lambda entry, url: results[entry])


# ----------------------------------------------------------------------- fsspec


def test_fsspec(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``info`` and ``cat_file`` of the cachefs filesystem (embedded mode)."""
    for name in [n for n in os.environ if n.startswith("CACHEFS_")]:
        monkeypatch.delenv(name)
    fs = fsspec.filesystem("cachefs", cache_dir=str(tmp_path / "cache"), skip_instance_cache=True)

    def check(entry: Entry, url: str) -> str | None:
        info, info_error = outcome(lambda: fs.info(url))
        data, cat_error = outcome(lambda: fs.cat_file(url))
        if entry.refused:
            return error_mismatch(entry, info_error) or error_mismatch(entry, cat_error)
        if info_error or cat_error:
            return f"refused: {info_error or cat_error}"
        if info["url"] != world.canonical(entry) or data != DATA:
            return f"accepted as {info['url']}"
        return None

    check_all(world, check)


# ------------------------------------------------------------------------- gRPC


def test_grpc(world: World, start_node: Callable[..., Any], tmp_path: Path) -> None:
    """A real node: ``NodeClient.stat``/``prefetch``, and ``Stat`` through the raw stub."""
    node = start_node(tmp_path / "node-cache", tcp=False, metrics=False)
    client = NodeClient(node.unix_endpoint)
    stub = pb_grpc.CacheStub(grpc.insecure_channel(node.unix_endpoint))

    def raw_stat(url: str) -> pb.ObjectInfo:
        return stub.Stat(pb.StatRequest(url=url), timeout=60)

    def check(entry: Entry, url: str) -> str | None:
        info, stat_error = outcome(lambda: client.stat(url))
        job, prefetch_error = outcome(lambda: client.prefetch([url]))
        reply, raw_error = outcome(lambda: raw_stat(url))
        if entry.refused:
            problem = error_mismatch(entry, stat_error) or error_mismatch(entry, prefetch_error)
            if problem:
                return problem
            if not isinstance(raw_error, grpc.RpcError):
                return f"raw Stat: {raw_error!r}"
            code, details = raw_error.code(), raw_error.details() or ""
            if code != grpc.StatusCode.INVALID_ARGUMENT or entry.refused not in details:
                return f"raw Stat: {code} {details!r}"
            return None
        if stat_error or prefetch_error or raw_error:
            return f"refused: {stat_error or prefetch_error or raw_error}"
        want = world.canonical(entry)
        if info.url != want or reply.url != want or job.state != "succeeded":
            return f"accepted as {info.url} / {reply.url}, job {job.state}"
        return None

    check_all(world, check)
    cached = {e.url for e in client.cached()}
    assert cached == {world.canonical(e) for e in ACCEPTED}


# -------------------------------------------------------------------------- CSI


def test_csi(
    world: World,
    start_node: Callable[..., Any],
    start_csi: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A real plugin: ``NodePublishVolume`` with the URL as ``source``; a refused one is
    INVALID_ARGUMENT with nothing mounted or pinned, an accepted one mounts its object."""
    node = start_node(tmp_path / "node-cache", tcp=False, metrics=False)
    plugin = start_csi(node.unix_endpoint, allow=world.allowed_prefixes())
    stub = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{plugin.socket_path}"))
    client = NodeClient(node.unix_endpoint)
    (tmp_path / "pods").mkdir()  # kubelet makes a target's parent, the plugin the target

    def publish(volume: str, target: Path, url: str) -> None:
        stub.NodePublishVolume(publish_request(volume, target, url), timeout=60)

    def published(volume: str, target: Path, url: str) -> bool:
        try:
            publish(volume, target, url)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:  # still prefetching: kubelet retries
                raise
            return False
        return True

    def check(entry: Entry, url: str) -> str | None:
        volume = f"vol-{TABLE.index(entry)}"
        target = tmp_path / "pods" / volume
        if entry.refused:
            _, error = outcome(lambda: publish(volume, target, url))
            if not isinstance(error, grpc.RpcError):
                return f"publish: {error!r}"
            code, details = error.code(), error.details() or ""
            if code != grpc.StatusCode.INVALID_ARGUMENT or entry.refused not in details:
                return f"publish: {code} {details!r}"
            if target.exists() or mounts_under(tmp_path) or client.status().pins:
                return "something was left mounted, created or pinned"
            return None
        try:
            wait_for(lambda: published(volume, target, url), timeout=60, interval=0.1)
        except grpc.RpcError as exc:
            return f"publish: {exc.code()} {exc.details()!r}"
        # The view names the object by the last segment of its canonical URL.
        mounted = target / world.canonical(entry).rsplit("/", 1)[1]
        content = mounted.read_bytes() if mounted.is_file() else None
        request = csi.NodeUnpublishVolumeRequest(volume_id=volume, target_path=str(target))
        stub.NodeUnpublishVolume(request, timeout=30)
        return None if content == DATA else f"{mounted.name} not mounted"

    check_all(world, check)
    assert mounts_under(tmp_path) == [] and client.status().pins == {}
    assert {e.url for e in client.cached()} == {world.canonical(e) for e in ACCEPTED}


def publish_request(volume: str, target: Path, source: str) -> csi.NodePublishVolumeRequest:
    """A publish as kubelet sends it for an inline ephemeral volume."""
    capability = csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(),
        access_mode=csi.VolumeCapability.AccessMode(
            mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
        ),
    )
    return csi.NodePublishVolumeRequest(
        volume_id=volume,
        target_path=str(target),
        volume_capability=capability,
        readonly=True,
        volume_context={
            "source": source,
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.name": "attacker-0",
            "csi.storage.k8s.io/pod.namespace": "default",
            "csi.storage.k8s.io/serviceAccount.name": "default",
        },
    )
