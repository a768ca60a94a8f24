"""Bytes read through the cache are the origin's bytes, fetched once per block.

Every origin kind (S3, plain HTTP, file://, memory://) serves whole reads, random
ranges and ranges across block boundaries identically to the origin; a restarted
engine serves from disk; concurrent cold readers share one GET per block; sequential
readers get read-ahead; a prefix prefetch fetches a model directory once.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import pytest
from servers import ByteRange, RangeHTTPServer, S3Bucket, wait_for

from cachefs.node.engine import Engine, Progress

BLOCK = 16 * 1024
# Sizes around block edges: empty, one byte, just under/at/over a block, ragged tails.
SIZES = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 123, 13 * BLOCK + 7)


def payload(size: int, seed: int) -> bytes:
    """Reproducible random bytes: every block differs, so misplaced blocks show."""
    return random.Random(seed).randbytes(size)


def block_ranges(size: int, block: int = BLOCK) -> list[ByteRange]:
    """The inclusive byte ranges of one GET per block of an object of ``size``."""
    return [(start, min(start + block, size) - 1) for start in range(0, size, block)]


def sorted_gets(gets: list[ByteRange | None]) -> list[ByteRange]:
    """GET ranges sorted; a full (unranged) GET fails the test."""
    assert None not in gets, f"an unranged GET reached the origin: {gets}"
    return sorted(r for r in gets if r is not None)


class OriginUnderTest:
    """One origin kind: put objects, name their URLs, count their GETs where possible."""

    def __init__(self, kind: str, put: Callable[[str, bytes], str], server: Any = None) -> None:
        self.kind = kind
        self._put = put
        self.server = server

    def put(self, key: str, data: bytes) -> str:
        """Create or overwrite ``key``; return its URL."""
        return self._put(key, data)

    def gets(self, key: str) -> list[ByteRange | None] | None:
        """GET ranges of ``key`` seen by the server; None for origins without a server."""
        if self.kind == "s3":
            return self.server.gets(key)
        if self.kind == "http":
            return self.server.gets("/" + key)
        return None

    def reset_requests(self) -> None:
        if self.server is not None:
            self.server.reset_requests()


@pytest.fixture(params=["s3", "http", "file", "memory"])
def origin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OriginUnderTest]:
    """Each origin kind in turn, with a put() that returns the object's URL."""
    kind = request.param
    if kind == "s3":
        s3: S3Bucket = request.getfixturevalue("s3")

        def put_s3(key: str, data: bytes) -> str:
            s3.put(key, data)
            return s3.url(key)

        yield OriginUnderTest(kind, put_s3, s3)
    elif kind == "http":
        http: RangeHTTPServer = request.getfixturevalue("http_origin")

        def put_http(key: str, data: bytes) -> str:
            http.put("/" + key, data)
            return http.url("/" + key)

        yield OriginUnderTest(kind, put_http, http)
    elif kind == "file":
        root = tmp_path / "origin"

        def put_file(key: str, data: bytes) -> str:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return f"file://{path}"

        yield OriginUnderTest(kind, put_file)
    else:
        memfs = fsspec.filesystem("memory")
        root = f"/cachefs-test-{uuid.uuid4().hex[:12]}"

        def put_memory(key: str, data: bytes) -> str:
            memfs.pipe_file(f"{root}/{key}", data)
            return f"memory://{root}/{key}"

        yield OriginUnderTest(kind, put_memory)
        if memfs.exists(root):
            memfs.rm(root, recursive=True)


def random_ranges(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    """``count`` (offset, length) pairs inside an object of ``size`` (some empty)."""
    ranges = []
    for _ in range(count):
        offset = rng.randrange(size + 1)
        length = (
            rng.randrange(size - offset + 1) if rng.random() < 0.3 else rng.randrange(3 * BLOCK)
        )
        ranges.append((offset, length))
    return ranges


def boundary_ranges(size: int) -> list[tuple[int, int]]:
    """Ranges that start, end or straddle every block boundary of the object."""
    ranges = []
    for edge in range(BLOCK, size, BLOCK):
        ranges += [
            (edge - 1, 2),
            (edge - 1, 1),
            (edge, 1),
            (edge - 10, BLOCK + 20),
            (edge - BLOCK // 2, BLOCK),
        ]
    return [(max(0, o), n) for o, n in ranges]


# ------------------------------------------------------------------ correctness


def test_reads_match_origin(origin: OriginUnderTest, make_engine: Callable[..., Engine]) -> None:
    """Whole reads, random ranges and boundary-straddling ranges equal the origin's
    bytes for every origin kind and awkward size; each block is fetched once."""
    engine = make_engine()
    rng = random.Random(1234)
    objects = {
        origin.put(f"data/obj-{size}.bin", payload(size, seed=size)): (f"data/obj-{size}.bin", size)
        for size in SIZES
    }
    for url, (_key, size) in objects.items():
        data = payload(size, seed=size)
        ranges = boundary_ranges(size) + random_ranges(rng, size, 60)
        rng.shuffle(ranges)
        for offset, length in ranges:
            got = engine.read(url, offset, length)
            assert got == data[offset : offset + length], (url, offset, length)
        assert engine.read(url) == data
        assert engine.read(url, 0, size + 100) == data  # a length past the end clips
        assert engine.read(url, size) == b""
        with pytest.raises(ValueError):
            engine.read(url, size + 1, 1)
        assert engine.stat(url).size == size
    assert engine.stats.snapshot()["fetched_bytes"] == sum(SIZES)
    for key, size in objects.values():
        gets = origin.gets(key)
        if gets is not None:
            assert sorted_gets(gets) == block_ranges(size), key


def test_restart_serves_from_disk(
    origin: OriginUnderTest, make_engine: Callable[..., Engine]
) -> None:
    """A new Engine on the same cache directory rebuilds its index from disk and
    serves every cached byte without a GET to the origin."""
    first = make_engine()
    urls = {}
    for size in SIZES:
        key = f"restart/obj-{size}.bin"
        urls[key] = (origin.put(key, payload(size, seed=size + 7)), size)
        assert first.read(urls[key][0]) == payload(size, seed=size + 7)
    first.close()

    origin.reset_requests()
    second = make_engine()
    rng = random.Random(99)
    for key, (url, size) in urls.items():
        data = payload(size, seed=size + 7)
        assert second.read(url) == data
        for offset, length in boundary_ranges(size) + random_ranges(rng, size, 20):
            assert second.read(url, offset, length) == data[offset : offset + length]
        gets = origin.gets(key)
        assert gets in (None, []), f"{key} was fetched again after the restart: {gets}"
    snapshot = second.stats.snapshot()
    assert snapshot["fetched_bytes"] == 0
    assert snapshot["origin_requests"].get("read", 0) == 0
    assert snapshot["served_bytes"].get("origin", 0) == 0


# ------------------------------------------------------------------ concurrency


def test_concurrent_cold_readers_share_one_get_per_block(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """32 threads reading one cold object at once (whole reads and random ranges) all
    get correct bytes, and the origin sees exactly one GET per block."""
    size = 37 * BLOCK + 1000
    data = payload(size, seed=32)
    s3.put("hot.bin", data)
    url = s3.url("hot.bin")
    engine = make_engine(concurrency=16)
    start = threading.Barrier(32)

    def reader(worker: int) -> int:
        rng = random.Random(worker)
        start.wait(timeout=30)
        checked = 0
        if worker % 4 == 0:
            assert engine.read(url) == data, f"worker {worker}: whole read differs"
            checked += 1
        for offset, length in random_ranges(rng, size, 8):
            got = engine.read(url, offset, length)
            assert got == data[offset : offset + length], (worker, offset, length)
            checked += 1
        return checked

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(reader, range(32)))
    assert sum(results) == 8 * 32 + 8
    assert sorted_gets(s3.gets("hot.bin")) == block_ranges(size)
    assert engine.read(url) == data
    assert len(s3.gets("hot.bin")) == len(block_ranges(size))


def _cachefs_config(tmp_path: Path, cache_dir: Path, **settings: Any) -> str:
    """A config file for the fsspec layer (which builds its engine from a config)."""
    import yaml

    config = {"cache_dir": str(cache_dir), "block_size": BLOCK, **settings}
    path = tmp_path / f"cachefs-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_sequential_open_reads_ahead(s3: S3Bucket, tmp_path: Path, cache_dir: Path) -> None:
    """Reading a file sequentially through fs.open makes the cache fetch the blocks
    after the read position before they are asked for, each block once."""
    size = 16 * BLOCK + 5
    data = payload(size, seed=16)
    s3.put("seq.bin", data)
    config = _cachefs_config(tmp_path, cache_dir, readahead_blocks=4)
    fs = fsspec.filesystem("cachefs", config=config)
    with fs.open(s3.url("seq.bin"), "rb") as f:
        assert f.read(BLOCK) == data[:BLOCK]
        assert f.read(BLOCK) == data[BLOCK : 2 * BLOCK]
        assert f.read(BLOCK) == data[2 * BLOCK : 3 * BLOCK]
        # The file asked for blocks 0-3 so far; blocks 4-7 come from read-ahead.
        read_ahead = {4 * BLOCK, 5 * BLOCK, 6 * BLOCK, 7 * BLOCK}

        def ahead_fetched() -> bool:
            starts = {r[0] for r in sorted_gets(s3.gets("seq.bin"))}
            return read_ahead <= starts

        wait_for(ahead_fetched, timeout=20, message="read-ahead GETs of blocks 4-7")
        starts = sorted(r[0] for r in sorted_gets(s3.gets("seq.bin")))
        assert starts == [i * BLOCK for i in range(8)], "read-ahead went past its window"
        rest = f.read()
        assert rest == data[3 * BLOCK :]
    assert sorted_gets(s3.gets("seq.bin")) == block_ranges(size)


# --------------------------------------------------------------------- prefetch


MODEL_FILES = {
    "config.json": 321,
    "model-00001-of-00002.safetensors": 5 * BLOCK + 17,
    "model-00002-of-00002.safetensors": 3 * BLOCK,
    "tokenizer/tokenizer.json": BLOCK + 1,
    "tokenizer/extra/vocab.txt": 0,
    "tokenizer/extra/merges.txt": 2 * BLOCK - 1,
}


def test_prefetch_model_directory(s3: S3Bucket, make_engine: Callable[..., Engine]) -> None:
    """Prefetching a prefix fetches every file below it (nested too) with one GET per
    block, reports monotonic byte progress ending at the total, and a second prefetch
    makes no GETs."""
    contents = {name: payload(size, seed=i) for i, (name, size) in enumerate(MODEL_FILES.items())}
    for name, data in contents.items():
        s3.put(f"models/llm/{name}", data)
    s3.put("models/llm-other/config.json", b"not part of the prefix")
    total = sum(MODEL_FILES.values())
    engine = make_engine(concurrency=8)
    seen: list[tuple[int, int, int, int]] = []

    def on_progress(p: Progress) -> None:
        seen.append((p.bytes_done, p.bytes_total, p.objects_done, p.objects_total))

    result = engine.prefetch([s3.url("models/llm/")], progress=on_progress)
    assert result.objects == len(MODEL_FILES)
    assert result.bytes == total
    assert result.fetched_bytes == total
    assert result.cached_before == 0
    assert sorted(ref.canonical for ref in result.manifest.objects) == sorted(
        s3.url(f"models/llm/{name}") for name in MODEL_FILES
    )
    for name, size in MODEL_FILES.items():
        assert sorted_gets(s3.gets(f"models/llm/{name}")) == block_ranges(size), name
    assert s3.gets("models/llm-other/config.json") == []

    done = [entry[0] for entry in seen]
    assert done == sorted(done), f"bytes_done went backwards: {done}"
    assert all(entry[1] == total for entry in seen)
    assert seen[-1] == (total, total, len(MODEL_FILES), len(MODEL_FILES))

    s3.reset_requests()
    for name, data in contents.items():
        assert engine.read(s3.url(f"models/llm/{name}")) == data
    again: list[int] = []
    second = engine.prefetch([s3.url("models/llm/")], progress=lambda p: again.append(p.bytes_done))
    assert second.fetched_bytes == 0
    assert second.cached_before == total
    assert again and again[-1] == total
    for name in MODEL_FILES:
        assert s3.gets(f"models/llm/{name}") == [], f"{name} fetched again"
