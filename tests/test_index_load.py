"""Loading the index at start: the warm path (one thread) and the cold-disk path (a
pool of readers) build the same index from the same files, with the same recovery.

A cache written by a real ``Store`` (complete, partial and digest-checked objects),
plus what crashes leave (a torn record, stale and fresh temporary files, a fresh
staging directory, a stray file, a data file grown past its size), is copied twice
and each copy opened along one path: the objects, their blocks, their order and
what was cleaned up must agree, and match what the files say.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import threading
import time
import zlib
from pathlib import Path

import pytest

from cachefs.node import layout
from cachefs.node.config import TierConfig
from cachefs.node.layout import Digest, ObjectHeader
from cachefs.node.store import Store, index
from cachefs.urls import object_id

BLOCK = layout.PAGE
HOUR_AGO = time.time() - 7200


def tier(root: Path) -> TierConfig:
    return TierConfig(name="disk", path=root, medium="disk", quota=1 << 30)


def write_cache(root: Path) -> dict[str, tuple[int, bool]]:
    """300 objects through the store: by id, the blocks each one's meta file records
    and whether it records the check against the origin's digest."""
    rng = random.Random(11)
    store = Store([tier(root)])
    expected: dict[str, tuple[int, bool]] = {}
    for i in range(300):
        blocks = 1 + i % 4
        data = rng.randbytes(blocks * BLOCK - (i % 3) * 100)
        url = f"s3://bucket/model/shard-{i:04d}.bin"
        digest = Digest("crc32", f"{zlib.crc32(data):08x}") if i % 2 else None
        header = ObjectHeader(object_id(url, "v1"), url, "v1", len(data), BLOCK, digest)
        obj = store.place(header)
        assert obj is not None
        written = blocks if i % 5 else blocks // 2  # every fifth one partial
        for index_ in range(written):
            start, end = header.block_span(index_)
            assert store.write_block(obj, index_, memoryview(data[start:end]))
        if written == blocks:
            assert store.verify_digest(obj)
        expected[header.id] = (written, written == blocks and digest is not None)
    return expected


def crash_leftovers(root: Path, expected: dict[str, tuple[int, bool]]) -> dict[str, Path]:
    """What crashes leave, each in its own object directory; the paths, by kind."""
    ids = sorted(expected)
    objects = layout.objects_dir(root)
    torn, grown, stale_tmp, fresh_tmp = (layout.object_dir(root, i) for i in ids[:4])
    with open(torn / "meta", "ab") as meta:
        meta.write(b"b 99 00ff")  # a record cut short: ignored, and ended with a newline
    with open(grown / "data", "ab") as data:
        data.write(b"past its size")
    del expected[grown.name]  # untrustworthy: retired
    leftovers = {
        "torn": torn,
        "grown": grown,
        "stale tmp": stale_tmp / "meta.4242-00000000.tmp",
        "fresh tmp": fresh_tmp / "meta.4242-11111111.tmp",
        "fresh staging": objects / ids[4][:2] / f".new-{ids[4]}-22222222",
        "stray": objects / "ab" / "stray",
    }
    leftovers["stale tmp"].write_bytes(b"half a meta file")
    os.utime(leftovers["stale tmp"], (HOUR_AGO, HOUR_AGO))
    leftovers["fresh tmp"].write_bytes(b"half a meta file")
    leftovers["fresh staging"].mkdir()
    leftovers["stray"].parent.mkdir(exist_ok=True)
    leftovers["stray"].write_bytes(b"not an object")
    return leftovers


def load(root: Path, cold: bool, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The index a store opened on ``root`` builds, in LRU order, along one path."""
    monkeypatch.setattr(index, "_COLD_READ_SECONDS", 0.0 if cold else float("inf"))
    threads = set()
    read_shard = index._read_shard

    def noting(shard: str) -> list[tuple[str, object]]:
        threads.add(threading.get_ident())
        return read_shard(shard)

    monkeypatch.setattr(index, "_read_shard", noting)
    loaded = index.rebuild(index.open_tier(tier(root), None))
    assert (len(threads) > 1) == cold, f"cold={cold} read on {len(threads)} threads"
    assert gc.isenabled()  # paused for the load only
    assert [obj.last_used for obj in loaded] == sorted(obj.last_used for obj in loaded)
    # The torn one's mtime is the load's own (its record was ended): left out.
    return [(obj.id, dict(obj.present), obj.digest_ok, obj.charged) for obj in loaded]


def test_warm_and_cold_loads_build_the_same_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = tmp_path / "written"
    expected = write_cache(written)
    leftovers = crash_leftovers(written, expected)
    copies = {}
    for name in ("warm", "cold"):
        copies[name] = tmp_path / name
        shutil.copytree(written, copies[name], symlinks=True)  # mtimes kept: same LRU order
    warm = load(copies["warm"], cold=False, monkeypatch=monkeypatch)
    cold = load(copies["cold"], cold=True, monkeypatch=monkeypatch)

    assert warm == cold
    assert {entry[0]: (len(entry[1]), entry[2]) for entry in warm} == expected
    for root in copies.values():
        relative = {kind: path.relative_to(written) for kind, path in leftovers.items()}
        assert (root / relative["torn"] / "meta").read_bytes().endswith(b"00ff\n")
        assert not (root / relative["grown"]).exists()
        assert not (root / relative["stale tmp"]).exists()
        assert (root / relative["fresh tmp"]).exists()
        assert (root / relative["fresh staging"]).is_dir()
        assert not (root / relative["stray"]).exists()
        assert list(layout.trash_dir(root).iterdir()) == []
