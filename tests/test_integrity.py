"""Integrity: corrupt cache files are found, refetched block by block, never served.

Each test fills a cache from a real HTTP origin, damages what is on disk (a flipped
byte, a truncated data file, a garbled or foreign meta file), then reads through an
engine and checks the bytes against the origin and the GETs the origin saw.
"""

from __future__ import annotations

import json
import os
import random
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest
from servers import RangeHTTPServer

from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.node.store import CachedObject

KIB = 1024
BLOCK = 64 * KIB
PATH = "/models/weights.bin"
DATA = random.Random(1).randbytes(8 * BLOCK + 777)  # 9 blocks, the last one short
LAST = 8


def make_engine(root: Path, readahead: int = 4) -> Engine:
    overrides = {"cache_dir": str(root), "block_size": "64KiB", "readahead_blocks": readahead}
    return Engine(load_config(overrides=overrides, environ={}))


def block_range(index: int, size: int = len(DATA)) -> tuple[int, int]:
    """The inclusive byte range a GET of block ``index`` asks for."""
    return index * BLOCK, min((index + 1) * BLOCK, size) - 1


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0x5A]))


def cached_object(engine: Engine, url: str) -> CachedObject:
    obj = engine.store.get(engine.stat(url).id)
    assert obj is not None
    return obj


def assert_trash_empty(root: Path) -> None:
    assert list((root / "v1" / "trash").iterdir()) == []


@pytest.fixture
def filled(http_origin: RangeHTTPServer, cache_dir: Path) -> Iterator[CachedObject]:
    """``DATA`` at ``PATH``, completely cached by an engine that is closed again."""
    http_origin.put(PATH, DATA)
    engine = make_engine(cache_dir)
    try:
        engine.prefetch([http_origin.url(PATH)])
        obj = cached_object(engine, http_origin.url(PATH))
        assert obj.complete
    finally:
        engine.close()
    http_origin.reset_requests()
    yield obj


@pytest.mark.parametrize("index", [0, 3, LAST])
def test_flipped_byte_refetches_only_that_block(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject, index: int
) -> None:
    """After a restart a flipped byte is caught by the checksum; only its block is fetched."""
    flip_byte(filled.data_path, index * BLOCK + 17)
    engine = make_engine(cache_dir)
    try:
        assert engine.read(http_origin.url(PATH)) == DATA
        assert http_origin.gets(PATH) == [block_range(index)]
    finally:
        engine.close()
    http_origin.reset_requests()
    engine = make_engine(cache_dir)  # the repair was recorded: nothing to fetch now
    try:
        assert engine.read(http_origin.url(PATH)) == DATA
        assert http_origin.gets(PATH) == []
    finally:
        engine.close()


def test_truncated_data_file_refetches_truncated_blocks(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject
) -> None:
    """A data file cut short loses the blocks past the cut; the blocks before it stay."""
    os.truncate(filled.data_path, 3 * BLOCK + 100)
    engine = make_engine(cache_dir)
    try:
        assert engine.read(http_origin.url(PATH)) == DATA
        gets = http_origin.gets(PATH)
        assert len(gets) == len(set(gets))
        assert set(gets) == {block_range(i) for i in range(3, LAST + 1)}
        assert Path(engine.open_local(http_origin.url(PATH))).read_bytes() == DATA
    finally:
        engine.close()


def test_data_file_grown_past_its_size_is_not_handed_out(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject
) -> None:
    """Bytes appended to a data file never reach an ``open_local`` caller."""
    with open(filled.data_path, "ab") as fh:
        fh.write(b"trailing garbage")
    engine = make_engine(cache_dir)
    try:
        path = Path(engine.open_local(http_origin.url(PATH)))
        assert path.read_bytes() == DATA
        assert engine.read(http_origin.url(PATH)) == DATA
    finally:
        engine.close()


def _garble_checksum(line: bytes) -> bytes:
    digit = line[-1:]
    return line[:-1] + (b"0" if digit != b"0" else b"1")


@pytest.mark.parametrize(
    "garble",
    [
        pytest.param(_garble_checksum, id="wrong-checksum"),
        pytest.param(lambda line: b"b 2 not-a-checksum!", id="unparseable"),
        pytest.param(lambda line: line[:9], id="cut-short"),
        pytest.param(lambda line: b"b 99 " + line.split()[2], id="index-out-of-range"),
    ],
)
def test_garbled_meta_line_refetches_its_block(
    http_origin: RangeHTTPServer,
    cache_dir: Path,
    filled: CachedObject,
    garble: Callable[[bytes], bytes],
) -> None:
    """A block line that is wrong or unreadable costs that block a refetch, nothing more."""
    lines = filled.meta_path.read_bytes().split(b"\n")
    target = next(i for i, line in enumerate(lines) if line.startswith(b"b 2 "))
    lines[target] = garble(lines[target])
    filled.meta_path.write_bytes(b"\n".join(lines))
    engine = make_engine(cache_dir)
    try:
        assert engine.read(http_origin.url(PATH)) == DATA
        assert http_origin.gets(PATH) == [block_range(2)]
    finally:
        engine.close()
    http_origin.reset_requests()
    engine = make_engine(cache_dir)
    try:
        assert engine.read(http_origin.url(PATH)) == DATA
        assert http_origin.gets(PATH) == []
    finally:
        engine.close()


def test_garbled_meta_header_retires_the_object(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject
) -> None:
    """A meta file whose header cannot be read is retired on start; the object is refetched."""
    raw = filled.meta_path.read_bytes()
    filled.meta_path.write_bytes(b"{not json" + raw[9:])
    engine = make_engine(cache_dir)
    try:
        assert engine.store.get(filled.id) is None
        assert not filled.directory.exists()
        assert_trash_empty(cache_dir)
        assert engine.read(http_origin.url(PATH)) == DATA
        assert sorted(http_origin.gets(PATH)) == [block_range(i) for i in range(LAST + 1)]
    finally:
        engine.close()


def test_verify_finds_a_flipped_byte(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject
) -> None:
    """``store.verify`` rereads every block on demand, even ones this process verified."""
    engine = make_engine(cache_dir)
    try:
        url = http_origin.url(PATH)
        assert engine.read(url) == DATA  # every block now verified in this process
        obj = cached_object(engine, url)
        assert engine.store.verify(obj) == []
        flip_byte(obj.data_path, 4 * BLOCK + 1000)
        assert engine.store.verify(obj) == [4]
        assert 4 not in obj.present and not obj.complete
        assert b"b 4 " not in obj.meta_path.read_bytes()
        http_origin.reset_requests()
        assert engine.read(url) == DATA
        assert http_origin.gets(PATH) == [block_range(4)]
        assert engine.store.verify(cached_object(engine, url)) == []
    finally:
        engine.close()


def test_open_local_verifies_the_whole_object(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject
) -> None:
    """``open_local`` of a complete object with a bad block repairs it before handing out."""
    flip_byte(filled.data_path, 5 * BLOCK + 3)
    engine = make_engine(cache_dir)
    try:
        path = Path(engine.open_local(http_origin.url(PATH)))
        assert path.read_bytes() == DATA
        assert http_origin.gets(PATH) == [block_range(5)]
    finally:
        engine.close()


def test_handed_out_file_is_not_repaired_in_place(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject
) -> None:
    """A repair of a file ``open_local`` handed out starts a new file; the old one stays."""
    engine = make_engine(cache_dir)
    try:
        url = http_origin.url(PATH)
        path = Path(engine.open_local(url))
        fd = os.open(path, os.O_RDONLY)
        try:
            old_inode = os.fstat(fd).st_ino
            flip_byte(path, 6 * BLOCK + 9)
            damaged = os.pread(fd, len(DATA) + 1, 0)
            assert damaged != DATA
            assert engine.store.verify(cached_object(engine, url)) == [6]

            new_path = Path(engine.open_local(url))
            assert new_path.stat().st_ino != old_inode
            assert new_path.read_bytes() == DATA
            assert engine.read(url) == DATA
            assert os.pread(fd, len(DATA) + 1, 0) == damaged
        finally:
            os.close(fd)
        assert_trash_empty(cache_dir)
    finally:
        engine.close()


@pytest.mark.parametrize("how", ["open_local", "read"])
def test_hard_linked_file_is_not_repaired_in_place(
    http_origin: RangeHTTPServer, cache_dir: Path, filled: CachedObject, tmp_path: Path, how: str
) -> None:
    """After a restart, a corrupt data file with another link (a view) is retired, not fixed.

    The linked inode keeps exactly the bytes it had; the cache serves a new file.
    """
    view = tmp_path / "view.bin"
    os.link(filled.data_path, view)
    flip_byte(view, 1 * BLOCK + 5)
    damaged = view.read_bytes()
    old_inode = view.stat().st_ino
    engine = make_engine(cache_dir)
    try:
        url = http_origin.url(PATH)
        if how == "open_local":
            path = Path(engine.open_local(url))
        else:
            assert engine.read(url) == DATA
            path = cached_object(engine, url).data_path
        assert path.stat().st_ino != old_inode
        assert engine.read(url) == DATA
        assert Path(engine.open_local(url)).read_bytes() == DATA
        assert view.read_bytes() == damaged
        assert view.stat().st_nlink == 1
        assert_trash_empty(cache_dir)
    finally:
        engine.close()


def _foreign_header(meta: bytes, other: bytes) -> bytes:
    return other.partition(b"\n")[0] + b"\n" + meta.partition(b"\n")[2]


def _wrong_url_header(meta: bytes, other: bytes) -> bytes:
    header = json.loads(meta.partition(b"\n")[0])
    header["url"] = json.loads(other.partition(b"\n")[0])["url"]
    return json.dumps(header, sort_keys=True).encode() + b"\n" + meta.partition(b"\n")[2]


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(_foreign_header, id="other-id"),
        pytest.param(_wrong_url_header, id="other-url"),
    ],
)
def test_foreign_meta_is_retired_on_start(
    http_origin: RangeHTTPServer, cache_dir: Path, forge: Callable[[bytes, bytes], bytes]
) -> None:
    """A meta file whose header names another object is retired when the store opens."""
    first, second = random.Random(2).randbytes(3 * BLOCK), random.Random(3).randbytes(2 * BLOCK)
    http_origin.put("/a.bin", first)
    http_origin.put("/b.bin", second)
    engine = make_engine(cache_dir)
    try:
        engine.prefetch([http_origin.url("/a.bin"), http_origin.url("/b.bin")])
        a = cached_object(engine, http_origin.url("/a.bin"))
        b = cached_object(engine, http_origin.url("/b.bin"))
    finally:
        engine.close()
    b.meta_path.write_bytes(forge(b.meta_path.read_bytes(), a.meta_path.read_bytes()))

    http_origin.reset_requests()
    engine = make_engine(cache_dir)
    try:
        assert engine.store.get(b.id) is None
        assert not b.directory.exists()
        assert_trash_empty(cache_dir)
        assert cached_object(engine, http_origin.url("/a.bin")).complete
        assert engine.read(http_origin.url("/a.bin")) == first
        assert engine.read(http_origin.url("/b.bin")) == second
        assert http_origin.gets("/a.bin") == []
        assert sorted(http_origin.gets("/b.bin")) == [(0, BLOCK - 1), (BLOCK, 2 * BLOCK - 1)]
    finally:
        engine.close()


_DISK_NAME = re.compile(
    r"FORMAT|LOCK|v1|objects|trash|pins|views|data|meta|[0-9a-f]{2}|[0-9a-f]{32}|[0-9a-f]{16}\.json"
)


def test_names_on_disk_are_hashes(http_origin: RangeHTTPServer, cache_dir: Path) -> None:
    """Origin keys with spaces, unicode, shell characters or great length never name a path."""
    keys = [
        "/odd dir/ünïcødé 模型 weights.bin",
        "/" + "long-segment-" * 40 + ".bin",
        "/shell $(x) `y` 'q' \"d\" ;&|<>*.bin",
        "/nested/" + "/".join(["deep"] * 30) + "/file name.bin",
    ]
    memory_key = f"memory://cachefs-names-{uuid.uuid4().hex}/spaced ü 名前/" + "y" * 400
    contents = {key: random.Random(key).randbytes(BLOCK + 10) for key in [*keys, memory_key]}
    for key in keys:
        http_origin.put(key, contents[key])
    memory = fsspec.filesystem("memory")
    memory.pipe_file(memory_key, contents[memory_key])
    urls = {http_origin.url(key): contents[key] for key in keys}
    urls[memory_key] = contents[memory_key]
    engine = make_engine(cache_dir)
    try:
        engine.prefetch(list(urls), pin="holder with spaces/ü/../..")
        for url, data in urls.items():
            assert engine.read(url) == data
            assert cached_object(engine, url).complete
    finally:
        engine.close()
        memory.rm(memory_key)
    names = [p.relative_to(cache_dir) for p in cache_dir.rglob("*")]
    assert len(names) > len(urls) * 2
    for name in names:
        for part in name.parts:
            assert _DISK_NAME.fullmatch(part), f"{part!r} is not a hashed name"
