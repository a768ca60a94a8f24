"""Quotas, LRU eviction, pins, tiers and full disks: the store's space invariants.

Usage (``used + reserved``) never passes a tier's quota, least recently used
unpinned objects go first, pinned objects stay, and a full disk evicts and retries
or serves bytes without caching, never recording a block whose bytes are not whole.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from servers import RangeHTTPServer

from cachefs.errors import QuotaExceededError
from cachefs.node import layout
from cachefs.node.callers import IN_PROCESS
from cachefs.node.config import load_config
from cachefs.node.engine import Engine, Progress
from cachefs.node.layout import PAGE, ObjectHeader
from cachefs.node.service import CacheService
from cachefs.node.store import CachedObject, Tier

KIB = 1024
MIB = 1024 * KIB
BLOCK = 64 * KIB
OBJECT_SIZE = 100 * KIB  # two blocks: one full, one partial
# What a complete OBJECT_SIZE object is charged: its pages plus one page of metadata.
FOOTPRINT = ObjectHeader("x", "file:///x", "v", OBJECT_SIZE, BLOCK).footprint()

EngineFactory = Callable[..., Engine]


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    """Build engines from tier specs (closed at teardown); the process env is ignored."""
    engines: list[Engine] = []

    def make(tiers: list[dict[str, Any]], **overrides: Any) -> Engine:
        # In-flight fills cannot be evicted: keep concurrency x block size well under
        # the quotas, so a fill finds room unless pins really fill the tier.
        settings = {"tiers": tiers, "block_size": "64KiB", "concurrency": 4, **overrides}
        config = load_config(overrides=settings, environ={})
        engine = Engine(config)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def disk_tier(path: Path, quota: int | str, name: str = "disk") -> dict[str, Any]:
    return {"name": name, "path": str(path), "medium": "disk", "quota": quota}


def write_objects(
    directory: Path, count: int, size: int = OBJECT_SIZE, prefix: str = "o"
) -> dict[str, bytes]:
    """``count`` files of random bytes under ``directory``; returns file URL -> bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{directory}-{count}-{size}")
    objects = {}
    for i in range(count):
        data = rng.randbytes(size)
        path = directory / f"{prefix}{i:03d}.bin"
        path.write_bytes(data)
        objects[f"file://{path}"] = data
    return objects


def source(directory: Path) -> str:
    return f"file://{directory}/"


def object_of(engine: Engine, url: str) -> CachedObject | None:
    """The store's entry for ``url``'s current version, or None."""
    return engine.store.get(engine.stat(url).id)


def complete_urls(engine: Engine, urls: Iterable[str]) -> set[str]:
    """Those of ``urls`` whose current version is complete in the store."""
    found = set()
    for url in urls:
        obj = object_of(engine, url)
        if obj is not None and obj.complete:
            found.add(url)
    return found


def usage_sampler(engine: Engine, tier: str) -> tuple[Callable[[Progress], None], list[int]]:
    """A progress callback recording the tier's ``used + reserved`` at each call."""
    samples: list[int] = []

    def on_progress(_progress: Progress) -> None:
        usage = next(u for u in engine.store.usage() if u.name == tier)
        samples.append(usage.used + usage.reserved)

    return on_progress, samples


def bad_recorded_blocks(root: Path) -> list[str]:
    """Every block recorded in a meta file under ``root`` whose bytes do not match.

    Reads the files directly, independent of the store's own verification.
    """
    bad = []
    for meta in layout.objects_dir(root).glob("*/*/meta"):
        header, blocks = layout.parse_meta(meta.read_bytes())
        data = (meta.parent / "data").read_bytes()
        for index, checksum in blocks.items():
            start, end = header.block_span(index)
            if len(data) < end or xxhash.xxh3_64_intdigest(data[start:end]) != checksum:
                bad.append(f"{header.url} block {index}")
    return bad


def assert_within_quota(tier: Tier, samples: list[int]) -> None:
    assert samples, "the progress callback never ran"
    assert max(samples) <= tier.quota
    assert tier.high_water <= tier.quota
    assert tier.used + tier.reserved <= tier.quota


def test_prefetch_of_three_quotas_stays_within_quota(
    make_engine: EngineFactory, http_origin: RangeHTTPServer, cache_dir: Path
) -> None:
    """A prefetch of 3x the quota over HTTP never takes usage past the quota.

    It completes, evicting its own earlier objects, reports how many are gone, and
    what stays is byte-correct.
    """
    quota = 1 * MIB
    rng = random.Random(1)
    objects: dict[str, bytes] = {}
    for i in range(3 * quota // OBJECT_SIZE + 1):
        data = rng.randbytes(OBJECT_SIZE)
        http_origin.put(f"/model/part-{i:03d}.bin", data)
        objects[http_origin.url(f"/model/part-{i:03d}.bin")] = data
    engine = make_engine([disk_tier(cache_dir, quota)])
    on_progress, samples = usage_sampler(engine, "disk")

    result = engine.prefetch([http_origin.url("/model/")], progress=on_progress)

    tier = engine.store.tier("disk")
    assert_within_quota(tier, samples)
    assert result.bytes == sum(map(len, objects.values())) > 3 * quota
    assert result.fetched_bytes == result.bytes
    assert tier.evictions > 0
    survivors = complete_urls(engine, objects)
    assert 0 < len(survivors) <= quota // FOOTPRINT
    assert result.evicted_during == len(objects) - len(survivors)
    for url in survivors:
        assert engine.read(url) == objects[url]
    assert bad_recorded_blocks(cache_dir) == []


def test_lru_evicts_least_recently_used_first(
    make_engine: EngineFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """Reading an old object makes it recent: the next evictions take the others first."""
    quota = 1 * MIB
    old = write_objects(tmp_path / "old", 8)
    engine = make_engine([disk_tier(cache_dir, quota)])
    old_urls = sorted(old)
    for url in old_urls:  # one at a time, so their ages are known
        engine.prefetch([url])
    assert complete_urls(engine, old_urls) == set(old_urls)
    assert engine.read(old_urls[0]) == old[old_urls[0]]  # now the most recent

    new = write_objects(tmp_path / "new", 4)
    engine.prefetch([source(tmp_path / "new")])

    assert complete_urls(engine, new) == set(new)
    survivors = complete_urls(engine, old_urls)
    assert old_urls[0] in survivors
    evicted = [url for url in old_urls if url not in survivors]
    assert evicted, "the new objects did not need room: the test proves nothing"
    # The evicted are exactly the oldest of the rest, in prefetch order.
    assert evicted == old_urls[1 : 1 + len(evicted)]
    assert engine.store.tier("disk").high_water <= quota


def test_pinned_objects_survive_pressure(
    make_engine: EngineFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """Pinned objects stay complete and correct while 3x the quota streams past."""
    quota = 1 * MIB
    pinned = write_objects(tmp_path / "pinned", 3)
    engine = make_engine([disk_tier(cache_dir, quota)])
    result = engine.prefetch([source(tmp_path / "pinned")], pin="job:a")
    assert result.pinned_by == "job:a"
    ids = sorted(engine.stat(url).id for url in pinned)
    assert engine.store.pins() == {"job:a": ids}

    write_objects(tmp_path / "bulk", 3 * quota // OBJECT_SIZE)
    on_progress, samples = usage_sampler(engine, "disk")
    engine.prefetch([source(tmp_path / "bulk")], progress=on_progress)

    tier = engine.store.tier("disk")
    assert_within_quota(tier, samples)
    assert tier.evictions > 0
    assert complete_urls(engine, pinned) == set(pinned)
    for url in pinned:
        obj = object_of(engine, url)
        assert engine.store.holders(obj.id) == ["job:a"]
        assert engine.store.verify(obj) == []
    before = engine.stats.snapshot()
    for url, data in pinned.items():
        assert engine.read(url) == data
    after = engine.stats.snapshot()
    assert after["fetched_bytes"] == before["fetched_bytes"]  # served from the cache


def test_pinning_more_than_the_quota_fails_and_leaves_no_pins(
    make_engine: EngineFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """A pin that cannot fit fails up front, names tier and sizes, and pins nothing new."""
    quota = 1 * MIB
    first = write_objects(tmp_path / "first", 2)
    engine = make_engine([disk_tier(cache_dir, quota)])
    engine.prefetch([source(tmp_path / "first")], pin="job:a")
    pins_before = engine.store.pins()
    write_objects(tmp_path / "big", quota // OBJECT_SIZE)  # with job:a's, past the quota

    with pytest.raises(QuotaExceededError) as caught:
        engine.prefetch([source(tmp_path / "big")], pin="job:b")

    message = str(caught.value)
    assert "'disk'" in message
    assert "1.0 MiB" in message  # the quota
    assert "100.0 KiB" in message  # the object's size
    assert "pin" in message
    assert engine.store.pins() == pins_before
    assert "job:b" not in engine.store.pins()
    engine.close()
    fresh = make_engine([disk_tier(cache_dir, quota)])
    assert fresh.store.pins() == pins_before
    assert complete_urls(fresh, first) == set(first)


def test_pins_persist_across_engines_and_unpin_releases_them(
    make_engine: EngineFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """Pins are on disk: a fresh engine keeps them; after unpin they can be evicted."""
    quota = 1 * MIB
    pinned = write_objects(tmp_path / "pinned", 3)
    engine = make_engine([disk_tier(cache_dir, quota)])
    engine.prefetch([source(tmp_path / "pinned")], pin="job:a")
    ids = sorted(engine.stat(url).id for url in pinned)
    engine.close()

    fresh = make_engine([disk_tier(cache_dir, quota)])
    assert fresh.store.pins() == {"job:a": ids}
    write_objects(tmp_path / "bulk", 3 * quota // OBJECT_SIZE)
    fresh.prefetch([source(tmp_path / "bulk")])
    assert complete_urls(fresh, pinned) == set(pinned)

    assert CacheService(fresh).unpin(IN_PROCESS, "job:a") == len(ids)
    assert fresh.store.pins() == {}
    write_objects(tmp_path / "more", 3 * quota // OBJECT_SIZE)
    fresh.prefetch([source(tmp_path / "more")])
    assert all(fresh.store.get(object_id) is None for object_id in ids)
    for object_id in ids:
        assert not layout.object_dir(cache_dir, object_id).exists()
    fresh.close()
    assert make_engine([disk_tier(cache_dir, quota)]).store.pins() == {}


def test_object_bigger_than_every_tier(
    make_engine: EngineFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """Reads of an object no tier can hold are correct and uncached; prefetch fails clearly."""
    quota = 256 * KIB
    (huge,) = write_objects(tmp_path / "huge", 1, size=600 * KIB).items()
    url, data = huge
    engine = make_engine(
        [
            {"name": "memory", "path": str(tmp_path / "mem"), "medium": "memory", "quota": quota},
            disk_tier(cache_dir, 2 * quota),
        ]
    )

    assert engine.read(url) == data
    assert engine.read(url, 70 * KIB, 200 * KIB) == data[70 * KIB : 270 * KIB]
    assert engine.read(url, len(data) - 5) == data[-5:]
    assert object_of(engine, url) is None
    assert engine.stats.snapshot()["uncached_bytes"] >= len(data)
    assert all(t.used + t.reserved <= t.quota for t in engine.store.tiers)

    with pytest.raises(QuotaExceededError) as caught:
        engine.prefetch([url])
    message = str(caught.value)
    assert url in message and "600.0 KiB" in message
    assert "memory" in message and "disk" in message and "512.0 KiB" in message

    with pytest.raises(QuotaExceededError):
        engine.prefetch([url], pin="job:a")
    assert engine.store.pins() == {}
    assert object_of(engine, url) is None


def test_two_tiers_placement(make_engine: EngineFactory, tmp_path: Path) -> None:
    """Objects live wholly in one tier: the named one, else the fastest with room.

    Room means room beside pinned objects: unpinned ones can be evicted.
    """
    memory_root, disk_root = tmp_path / "mem", tmp_path / "disk"
    memory_quota = 3 * FOOTPRINT + 2 * PAGE
    engine = make_engine(
        [
            {"name": "memory", "path": str(memory_root), "medium": "memory", "quota": memory_quota},
            disk_tier(disk_root, "4MiB"),
        ]
    )
    small = write_objects(tmp_path / "small", 2)
    large = write_objects(tmp_path / "large", 1, size=700 * KIB)  # over memory's quota
    on_disk = write_objects(tmp_path / "on_disk", 1)
    in_memory = write_objects(tmp_path / "in_memory", 1)
    crowd = write_objects(tmp_path / "crowd", 2)

    engine.prefetch([source(tmp_path / "small")], pin="job:a")  # the fastest tier
    engine.prefetch([source(tmp_path / "large")])  # fits only on disk
    engine.prefetch([source(tmp_path / "on_disk")], tier="disk")  # though memory has room
    engine.prefetch([source(tmp_path / "in_memory")], tier="memory", pin="job:b")
    engine.prefetch([source(tmp_path / "crowd")])  # memory is all pinned now

    def tier_of(url: str) -> str:
        obj = object_of(engine, url)
        assert obj is not None and obj.complete
        return obj.tier.name

    assert {tier_of(url) for url in small} == {"memory"}
    assert {tier_of(url) for url in large} == {"disk"}
    assert {tier_of(url) for url in on_disk} == {"disk"}
    assert {tier_of(url) for url in in_memory} == {"memory"}
    assert {tier_of(url) for url in crowd} == {"disk"}
    everything = {**small, **large, **on_disk, **in_memory, **crowd}
    for url, data in everything.items():
        object_id = engine.stat(url).id
        homes = [
            root for root in (memory_root, disk_root) if layout.object_dir(root, object_id).exists()
        ]
        assert len(homes) == 1, f"{url} is in {homes}"
        assert engine.read(url) == data
    for tier in engine.store.tiers:
        assert tier.high_water <= tier.quota

    write_objects(tmp_path / "extra", 1)
    with pytest.raises(QuotaExceededError, match="'memory'"):
        engine.prefetch([source(tmp_path / "extra")], pin="job:c", tier="memory")
    assert "job:c" not in engine.store.pins()
    with pytest.raises(ValueError, match="memory, disk"):
        engine.prefetch([source(tmp_path / "small")], tier="nvme")


def test_restart_with_smaller_quota_evicts_down_to_it(
    make_engine: EngineFactory, tmp_path: Path, cache_dir: Path
) -> None:
    """A fresh engine with a smaller quota evicts the least recently used down to it."""
    objects = write_objects(tmp_path / "src", 8)
    urls = sorted(objects)
    engine = make_engine([disk_tier(cache_dir, 1 * MIB)])
    for url in urls:
        engine.prefetch([url])
    engine.close()
    # Fill times a second apart, oldest first, as the store reads recency on start.
    for age, url in enumerate(reversed(urls), start=1):
        meta = layout.object_dir(cache_dir, engine.stat(url).id) / "meta"
        os.utime(meta, (meta.stat().st_atime, meta.stat().st_mtime - age))

    smaller = 3 * FOOTPRINT + PAGE
    fresh = make_engine([disk_tier(cache_dir, smaller)])
    tier = fresh.store.tier("disk")
    assert tier.used <= smaller
    assert tier.high_water <= smaller
    survivors = complete_urls(fresh, urls)
    assert survivors == set(urls[-3:])  # the most recently filled
    on_disk = {p.name for p in layout.objects_dir(cache_dir).glob("*/*") if p.is_dir()}
    assert on_disk == {fresh.stat(url).id for url in survivors}
    for url in survivors:
        assert fresh.read(url) == objects[url]


def test_full_disk_evicts_retries_and_never_records_torn_blocks(
    make_engine: EngineFactory,
    tmp_path: Path,
    small_tmpfs: Callable[[int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quota larger than the disk: ENOSPC evicts and retries, reads stay correct.

    Every block recorded on disk afterwards matches its checksum, also for a fresh
    engine, and nothing is written outside the tier root.
    """
    for name in ("HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    root = small_tmpfs(4 * MIB) / "cache"
    objects = write_objects(tmp_path / "src", 40, size=256 * KIB)  # 10 MiB
    outside_before = _tree(tmp_path, skip=root.parent)
    engine = make_engine([disk_tier(root, "64MiB")])

    result = engine.prefetch([source(tmp_path / "src")])
    assert result.fetched_bytes == result.bytes
    assert 0 < result.evicted_during < len(objects)
    for url, data in objects.items():
        assert engine.read(url) == data
    for url, data in reversed(objects.items()):
        assert engine.read(url, 1000, 100 * KIB) == data[1000 : 1000 + 100 * KIB]
    assert engine.store.tier("disk").evictions > 0
    assert any(obj.complete for obj in engine.store.objects())
    for obj in engine.store.objects():
        assert engine.store.verify(obj) == []
    assert bad_recorded_blocks(root) == []
    engine.close()

    fresh = make_engine([disk_tier(root, "64MiB")])
    for obj in fresh.store.objects():
        assert fresh.store.verify(obj) == []
    for url, data in objects.items():
        assert fresh.read(url) == data
    assert bad_recorded_blocks(root) == []
    assert _tree(tmp_path, skip=root.parent) == outside_before


def test_store_writes_only_under_tier_roots(
    make_engine: EngineFactory,
    tmp_path: Path,
    http_origin: RangeHTTPServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fills, pins, evictions and restarts touch nothing outside the tier roots."""
    for name in ("HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    objects = write_objects(tmp_path / "src", 12)
    http_origin.put("/..escape..%20..", b"x" * 5000)  # odd, but no dot segment
    memory_root, disk_root = tmp_path / "roots" / "mem", tmp_path / "roots" / "disk"
    tiers = [
        {"name": "memory", "path": str(memory_root), "medium": "memory", "quota": "640KiB"},
        disk_tier(disk_root, "2MiB"),
    ]
    before = _tree(tmp_path, skip=tmp_path / "roots")

    engine = make_engine(tiers)
    engine.prefetch([sorted(objects)[0]], pin="job:a")
    engine.prefetch([source(tmp_path / "src")])
    assert engine.read(http_origin.url("/..escape..%20..")) == b"x" * 5000
    with pytest.raises(ValueError, match="encoded"):  # a key that would leave: refused
        engine.read(http_origin.url("/a%2F..%2F..%2Fescape"))
    CacheService(engine).evict(IN_PROCESS, [sorted(objects)[-1]])
    CacheService(engine).unpin(IN_PROCESS, "job:a")
    engine.close()
    make_engine(tiers).prefetch([source(tmp_path / "src")])

    assert _tree(tmp_path, skip=tmp_path / "roots") == before
    assert {p.name for p in (tmp_path / "roots").iterdir()} == {"mem", "disk"}


def _tree(top: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``top`` (except ``skip`` and below) with its size and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            st = (here / name).lstat()
            found[str((here / name).relative_to(top))] = (st.st_size, st.st_mtime_ns)
    return found
