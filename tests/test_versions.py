"""An object overwritten at the origin is never served as a mix of two versions.

Each read is pinned to the version its stat saw: it returns that version's bytes
entirely, or fails with VersionChangedError. A new stat (revalidation) moves new
reads to the new version, and blocks cached for the old version are never served
for the new one. This holds for S3 (If-Match), HTTP servers that honour If-Match,
ignore it, or send no ETag at all, for prefix prefetches and for open files.
"""

from __future__ import annotations

import errno
import random
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml
from helpers import Background
from servers import ByteRange, Gate, RangeHTTPServer, S3Bucket, wait_for

from cachefs.errors import VersionChangedError
from cachefs.node.engine import Engine

BLOCK = 16 * 1024
SIZE = 6 * BLOCK + 321


def versions_of(size: int, count: int, seed: int) -> list[bytes]:
    """``count`` payloads of ``size`` bytes that differ in every block."""
    rng = random.Random(seed)
    out: list[bytes] = []
    while len(out) < count:
        candidate = rng.randbytes(size)
        if all(
            candidate[i : i + BLOCK] != other[i : i + BLOCK]
            for other in out
            for i in range(0, size, BLOCK)
        ):
            out.append(candidate)
    return out


def sorted_gets(gets: list[ByteRange | None]) -> list[ByteRange]:
    assert None not in gets, f"an unranged GET reached the origin: {gets}"
    return sorted(r for r in gets if r is not None)


def block_ranges(size: int) -> list[ByteRange]:
    return [(start, min(start + BLOCK, size) - 1) for start in range(0, size, BLOCK)]


class VersionedOrigin:
    """An S3 bucket or an HTTP server (in one of its If-Match / ETag behaviours)."""

    def __init__(self, kind: str, server: Any) -> None:
        self.kind = kind
        self.server = server

    def _path(self, key: str) -> str:
        return key if self.kind == "s3" else "/" + key

    def put(self, key: str, data: bytes) -> str:
        """Create or overwrite ``key``; return its URL."""
        self.server.put(self._path(key), data)
        return self.url(key)

    def url(self, key: str) -> str:
        return self.server.url(self._path(key))

    def gets(self, key: str) -> list[ByteRange | None]:
        return self.server.gets(self._path(key))

    def hold_gets(self, key: str, min_start: int) -> Gate:
        return self.server.hold_gets(self._path(key), min_start=min_start)

    def reset_requests(self) -> None:
        self.server.reset_requests()


ORIGIN_KINDS = ["s3", "http", "http-ignore-if-match", "http-no-etag"]


@pytest.fixture(params=ORIGIN_KINDS)
def origin(request: pytest.FixtureRequest) -> VersionedOrigin:
    """S3, and HTTP that honours If-Match, ignores it, or sends no ETag."""
    kind = request.param
    if kind == "s3":
        return VersionedOrigin(kind, request.getfixturevalue("s3"))
    http: RangeHTTPServer = request.getfixturevalue("http_origin")
    http.ignore_if_match = kind == "http-ignore-if-match"
    http.send_etag = kind != "http-no-etag"
    return VersionedOrigin(kind, http)


def assert_whole_version(
    got: Any, candidates: list[bytes], start: int = 0, end: int = SIZE
) -> None:
    """``got`` is one candidate's bytes [start, end), or a VersionChangedError."""
    if isinstance(got, BaseException):
        assert isinstance(got, VersionChangedError), f"unexpected error: {got!r}"
        assert got.errno is not None and "changed at the origin" in str(got)
        return
    assert any(got == v[start:end] for v in candidates), (
        f"read of [{start}, {end}) matches no single version: a mix of versions"
    )


def assert_store_unmixed(engine: Engine, contents: dict[str, list[bytes]]) -> None:
    """Every cached object holds blocks of one version only, of its own URL."""
    for obj in engine.store.objects():
        candidates = contents[obj.header.url]
        raw = obj.data_path.read_bytes()
        spans = [obj.header.block_span(i) for i in sorted(obj.present)]
        matching = [
            v
            for v in candidates
            if len(v) == obj.header.size and all(raw[s:e] == v[s:e] for s, e in spans)
        ]
        assert matching, f"cached object {obj.header.url} ({obj.header.version}) mixes versions"


# ------------------------------------------------------------ single objects


def test_overwrite_between_reads(
    origin: VersionedOrigin, make_engine: Callable[..., Engine]
) -> None:
    """A read pinned (by a cached stat) to the old version fails clearly once the
    origin has new bytes; the next read sees the new version, none of the old blocks."""
    old, new = versions_of(SIZE, 2, seed=1)
    url = origin.put("obj.bin", old)
    engine = make_engine(revalidate_after=3600)
    assert engine.read(url, 0, 100) == old[:100]

    origin.put("obj.bin", new)
    with pytest.raises(VersionChangedError) as caught:
        engine.read(url)
    assert caught.value.errno == errno.ESTALE
    assert url in str(caught.value)
    assert_store_unmixed(engine, {engine.stat(url).canonical: [old, new]})

    origin.reset_requests()
    assert engine.read(url) == new, "after a version change the next read must see the new one"
    assert sorted_gets(origin.gets("obj.bin")) == block_ranges(SIZE)
    assert engine.read(url, 0, 100) == new[:100]


def test_overwrite_during_multiblock_read(
    origin: VersionedOrigin, make_engine: Callable[..., Engine]
) -> None:
    """An overwrite while a multi-block read waits on the origin yields the old bytes
    or VersionChangedError, never a mix; a fresh stat then reads only new bytes."""
    old, new = versions_of(SIZE, 2, seed=2)
    url = origin.put("obj.bin", old)
    engine = make_engine(revalidate_after=0)
    gate = origin.hold_gets("obj.bin", min_start=BLOCK)
    with gate:
        read = Background(lambda: engine.read(url))
        gate.wait_held(1)
        origin.put("obj.bin", new)
    got = read.outcome()
    assert_whole_version(got, [old])  # the read was pinned to the old version
    contents = {engine.stat(url).canonical: [old, new]}
    assert_store_unmixed(engine, contents)

    origin.reset_requests()
    assert engine.read(url) == new
    assert sorted_gets(origin.gets("obj.bin")) == block_ranges(SIZE)
    assert_store_unmixed(engine, contents)


def test_overwrite_with_other_size_during_read(
    origin: VersionedOrigin, make_engine: Callable[..., Engine]
) -> None:
    """An overwrite that changes the size mid-read is detected as well."""
    old = versions_of(SIZE, 1, seed=3)[0]
    new = versions_of(SIZE + 3 * BLOCK, 1, seed=4)[0]
    url = origin.put("obj.bin", old)
    engine = make_engine(revalidate_after=0)
    with origin.hold_gets("obj.bin", min_start=2 * BLOCK) as gate:
        read = Background(lambda: engine.read(url, BLOCK // 2, 4 * BLOCK))
        gate.wait_held(1)
        origin.put("obj.bin", new)
    assert_whole_version(read.outcome(), [old], BLOCK // 2, BLOCK // 2 + 4 * BLOCK)
    assert engine.read(url) == new


def test_concurrent_readers_and_overwrites_never_mix(
    origin: VersionedOrigin, make_engine: Callable[..., Engine]
) -> None:
    """Readers revalidating on every read while the object is overwritten again and
    again each get one version's bytes entirely, or VersionChangedError."""
    contents = versions_of(SIZE, 5, seed=5)
    url = origin.put("obj.bin", contents[0])
    engine = make_engine(revalidate_after=0, readahead_blocks=2)
    lock = threading.Lock()
    reads_done = [0]
    outcomes: list[str] = []
    writer_done = threading.Event()
    failures: list[str] = []

    def reader(worker: int) -> None:
        rng = random.Random(worker)
        extra = 0
        while extra < 3:
            if rng.random() < 0.5:
                start, end = 0, SIZE
            else:
                start = rng.randrange(SIZE)
                end = min(SIZE, start + rng.randrange(1, 3 * BLOCK))
            try:
                got: Any = engine.read(url, start, end - start)
            except VersionChangedError as exc:
                got = exc
            except BaseException as exc:  # reported below, not swallowed
                failures.append(repr(exc))
                return
            try:
                assert_whole_version(got, contents, start, end)
            except AssertionError as exc:
                failures.append(str(exc))
                return
            with lock:
                reads_done[0] += 1
                outcomes.append("error" if isinstance(got, BaseException) else "bytes")
            if writer_done.is_set():
                extra += 1

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        for data in contents[1:]:
            target = reads_done[0] + 6
            wait_for(lambda t=target: reads_done[0] >= t or failures, 30, message="reads")
            origin.put("obj.bin", data)
    finally:
        writer_done.set()  # readers finish a few more reads, then stop
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert not failures, failures[0]
    assert "bytes" in outcomes
    assert engine.read(url) == contents[-1]
    assert_store_unmixed(engine, {engine.stat(url).canonical: contents})


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_revalidation_after_ttl(
    kind: str, request: pytest.FixtureRequest, make_engine: Callable[..., Engine]
) -> None:
    """With a short revalidate_after, reads move from the cached old version to the
    new one once the stat expires, every read whole, and the new version's blocks
    are all fetched (no old block reused)."""
    server = request.getfixturevalue("s3" if kind == "s3" else "http_origin")
    origin = VersionedOrigin(kind, server)
    old, new = versions_of(SIZE, 2, seed=6)
    url = origin.put("obj.bin", old)
    engine = make_engine(revalidate_after=0.2)
    assert engine.read(url) == old
    origin.reset_requests()
    origin.put("obj.bin", new)

    def sees_new() -> bool:
        got = engine.read(url)
        assert got in (old, new), "a read mixed the old and new versions"
        return got == new

    wait_for(sees_new, timeout=20, interval=0.05, message="the new version after revalidation")
    assert engine.read(url) == new
    assert sorted_gets(origin.gets("obj.bin")) == block_ranges(SIZE)
    old_ids = {o.id for o in engine.store.objects() if o.header.version != engine.stat(url).version}
    assert old_ids, "the old version's object should still be cached, and never served"


# ----------------------------------------------------------------- prefixes


def _put_tree(s3: S3Bucket, contents: dict[str, bytes]) -> None:
    for name, data in contents.items():
        s3.put(f"model/{name}", data)


def test_prefetch_fails_clearly_when_a_file_changes(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """A prefix prefetch lists once; a file overwritten while its blocks are in flight
    fails the job with VersionChangedError naming it, and no cached file mixes versions."""
    names = ["a.bin", "sub/b.bin", "sub/deeper/c.bin"]
    old = dict(zip(names, versions_of(SIZE, 3, seed=7), strict=True))
    new_b = versions_of(SIZE, 1, seed=8)[0]
    _put_tree(s3, old)
    engine = make_engine(revalidate_after=0, concurrency=4)
    with s3.hold_gets("model/sub/b.bin", min_start=BLOCK) as gate:
        job = Background(lambda: engine.prefetch([s3.url("model/")]))
        gate.wait_held(1)
        s3.put("model/sub/b.bin", new_b)
    outcome = job.outcome()
    assert isinstance(outcome, VersionChangedError), f"prefetch should fail: {outcome!r}"
    assert "model/sub/b.bin" in str(outcome)
    requests = engine.stats.snapshot()["origin_requests"]
    assert requests.get("list") == 1 and requests.get("stat", 0) == 0, requests
    contents = {s3.url(f"model/{n}"): [old[n]] for n in names}
    contents[s3.url("model/sub/b.bin")].append(new_b)
    assert_store_unmixed(engine, contents)
    assert engine.read(s3.url("model/sub/b.bin")) == new_b
    assert engine.read(s3.url("model/a.bin")) == old["a.bin"]


def test_prefetch_keeps_manifest_version(s3: S3Bucket, make_engine: Callable[..., Engine]) -> None:
    """A file overwritten after the prefetch fetched it stays cached at the version the
    manifest named; a new stat then reads the new bytes, not the cached ones."""
    names = ["a.bin", "z/b.bin"]
    old = dict(zip(names, versions_of(SIZE, 2, seed=9), strict=True))
    new_a = versions_of(SIZE, 1, seed=10)[0]
    _put_tree(s3, old)
    engine = make_engine(revalidate_after=0)
    with s3.hold_gets("model/z/b.bin", min_start=0) as gate:
        job = Background(lambda: engine.prefetch([s3.url("model/")]))
        gate.wait_held(1)
        wait_for(
            lambda: (
                len(s3.gets("model/a.bin")) == len(block_ranges(SIZE))
                and any(
                    o.complete and o.header.url.endswith("/a.bin") for o in engine.store.objects()
                )
            ),
            message="a.bin fully prefetched",
        )
        s3.put("model/a.bin", new_a)
    result = job.outcome()
    assert not isinstance(result, BaseException), result
    (ref_a,) = [r for r in result.manifest.objects if r.canonical.endswith("/a.bin")]
    assert engine.read_ref(ref_a) == old["a.bin"]
    assert engine.read(s3.url("model/a.bin")) == new_a
    assert engine.read(s3.url("model/z/b.bin")) == old["z/b.bin"]


def test_listing_does_not_hide_later_overwrites(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """After a prefix was listed, an overwritten file is still seen at its new version
    (a stale listing cache must not pin the old one), and a new file is a file."""
    old, new = versions_of(SIZE, 2, seed=11)
    s3.put("model/a.bin", old)
    engine = make_engine(revalidate_after=0)
    engine.prefetch([s3.url("model/")])
    s3.put("model/a.bin", new)
    s3.put("model/late.bin", b"late")
    assert engine.read(s3.url("model/a.bin")) == new
    assert engine.read(s3.url("model/late.bin")) == b"late"


# --------------------------------------------------------------- open files


@pytest.fixture
def cachefs_fs(tmp_path: Path, cache_dir: Path) -> Any:
    """A cachefs filesystem (unchained) that revalidates on every open."""
    config = {"cache_dir": str(cache_dir), "block_size": BLOCK, "revalidate_after": 0}
    path = tmp_path / f"cachefs-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return fsspec.filesystem("cachefs", config=str(path))


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_open_file_stays_pinned(kind: str, request: pytest.FixtureRequest, cachefs_fs: Any) -> None:
    """A file opened before an overwrite never returns new bytes: later reads give the
    old bytes or VersionChangedError; a new open reads the new version entirely."""
    origin = VersionedOrigin(kind, request.getfixturevalue("s3" if kind == "s3" else "http_origin"))
    old, new = versions_of(SIZE, 2, seed=12)
    url = origin.put("obj.bin", old)
    with cachefs_fs.open(url, "rb") as f:
        assert f.read(100) == old[:100]
        origin.put("obj.bin", new)
        f.seek(4 * BLOCK)
        try:
            got: Any = f.read(BLOCK)
        except VersionChangedError as exc:
            got = exc
        assert_whole_version(got, [old], 4 * BLOCK, 5 * BLOCK)
        f.seek(10)
        assert f.read(50) == old[10:60]
    with cachefs_fs.open(url, "rb") as f:
        assert f.read() == new


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_open_local_file_stays_pinned(
    kind: str, request: pytest.FixtureRequest, cachefs_fs: Any
) -> None:
    """A complete object opens as a local file of its version; an overwrite at the
    origin does not change what that file reads, and a new open sees the new bytes."""
    origin = VersionedOrigin(kind, request.getfixturevalue("s3" if kind == "s3" else "http_origin"))
    old, new = versions_of(SIZE, 2, seed=13)
    url = origin.put("obj.bin", old)
    local = cachefs_fs.open_local(url)
    with cachefs_fs.open(url, "rb") as f:
        assert Path(f.name).samefile(local)
        assert f.read(BLOCK) == old[:BLOCK]
        origin.put("obj.bin", new)
        assert f.read() == old[BLOCK:]
    assert Path(local).read_bytes() == old
    with cachefs_fs.open(url, "rb") as f:
        assert f.read() == new
    assert Path(cachefs_fs.open_local(url)).read_bytes() == new
