"""The store's space bookkeeping: LRU order, pins, busy objects, pinned bytes, storms.

The store keeps each tier's objects apart by what eviction may do with them (pinned,
in use, evictable in LRU order) instead of scanning the tier for every eviction.
These tests drive a real ``Store`` on real files and check, from the outside, that
the order, the pins and the figures it keeps that way are the ones the rules give.
"""

from __future__ import annotations

import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from cachefs.node import layout
from cachefs.node.config import TierConfig
from cachefs.node.layout import PAGE, ObjectHeader
from cachefs.node.store import CachedObject, Store, Tier
from cachefs.urls import object_id

BLOCK = PAGE  # one page per block: footprints are whole pages, figures exact
SMALL = ObjectHeader("x", "file:///x", "v", BLOCK, BLOCK).footprint()  # one block: 2 pages
PAIR = ObjectHeader("x", "file:///x", "v", 2 * BLOCK, BLOCK).footprint()  # two: 3 pages


def disk(root: Path, quota: int, name: str = "disk") -> TierConfig:
    return TierConfig(name=name, path=root, medium="disk", quota=quota)


def header(name: str, blocks: int = 1) -> ObjectHeader:
    url = f"file:///origin/{name}"
    return ObjectHeader(object_id(url, "v1"), url, "v1", blocks * BLOCK, BLOCK)


def payload(name: str, index: int) -> bytes:
    return random.Random(f"{name}/{index}").randbytes(BLOCK)


def fill(
    store: Store,
    name: str,
    blocks: int = 1,
    pin: str | None = None,
    tier: str | None = None,
    only: int | None = None,
) -> CachedObject:
    """Place object ``name`` and write its blocks (``only``: just that one)."""
    obj = store.place(header(name, blocks), tier_name=tier, pin_holder=pin)
    assert obj is not None, f"no room for {name}"
    with store.in_use(obj):
        for index in range(blocks) if only is None else [only]:
            assert store.write_block(obj, index, memoryview(payload(name, index)))
    return obj


def removals(store: Store) -> list[str]:
    """The ids of the objects ``store`` removes from now on, in order."""
    removed: list[str] = []
    store.removed_listeners.append(removed.append)
    return removed


def pinned_footprints(store: Store, tier: Tier) -> int:
    """What a tier's pinned bytes must be, worked out from its objects and the pins."""
    return sum(o.header.footprint() for o in tier.objects.values() if store.holders(o.id))


def assert_pinned_bytes_hold(store: Store) -> None:
    usage = {u.name: u for u in store.usage()}
    for tier in store.tiers:
        expected = pinned_footprints(store, tier)
        assert store.pinned_bytes(tier) == expected, tier.name
        assert usage[tier.name].pinned == expected, tier.name


def pins_on_disk(root: Path) -> dict[str, list[str]]:
    """The pins as their files hold them, read without the store."""
    pins = {}
    for path in layout.pins_dir(root).glob("*.json"):
        record = json.loads(path.read_text())
        pins[record["holder"]] = sorted(record["objects"])
    return pins


def test_eviction_order_is_least_recently_used(cache_dir: Path) -> None:
    """Every kind of use makes an object the most recent, and evictions take the least
    recently used first, one per new object; after a restart the order is the meta
    files' mtimes."""
    store = Store([disk(cache_dir, 8 * PAIR)])
    removed = removals(store)
    objects = {f"o{i}": fill(store, f"o{i}", blocks=2) for i in range(8) if i != 5}
    objects["o5"] = fill(store, "o5", blocks=2, only=0)  # its second block comes later
    assert removed == []

    def use(name: str, how: str) -> None:
        obj = objects[name]
        if how == "read":
            buffer = bytearray(BLOCK)
            assert store.read(obj, 1, 0, memoryview(buffer))
            assert buffer == payload(name, 1)
        elif how == "pread":
            assert store.pread(obj, 0, BLOCK) == payload(name, 0)
        elif how == "path":
            assert store.local_path(obj) == obj.data_path
        else:  # a block recorded
            with store.in_use(obj):
                assert store.write_block(obj, 1, memoryview(payload(name, 1)))

    order = [
        ("o3", "read"),
        ("o0", "pread"),
        ("o6", "path"),
        ("o1", "read"),
        ("o7", "pread"),
        ("o5", "record"),
        ("o2", "path"),
        ("o4", "read"),
    ]
    for name, how in order:
        use(name, how)
    assert removed == []

    for i in range(8):
        fill(store, f"new{i}", blocks=2)
        assert len(removed) == i + 1  # one eviction makes room for each
    assert removed == [objects[name].id for name, _ in order]
    assert store.tier("disk").high_water <= 8 * PAIR

    # A restart reads recency from the meta files: give them a known order.
    news = [header(f"new{i}", blocks=2).id for i in range(8)]
    ranks = [news[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    base = 1_600_000_000
    for rank, object_id_ in enumerate(ranks):
        meta = layout.object_dir(cache_dir, object_id_) / "meta"
        os.utime(meta, (base + rank, base + rank))
    fresh = Store([disk(cache_dir, 8 * PAIR)])
    removed = removals(fresh)
    for i in range(8):
        fill(fresh, f"later{i}", blocks=2)
    assert removed == ranks


def test_pinned_objects_stay_until_unpinned(cache_dir: Path) -> None:
    """Pinned objects survive many times the quota streaming past; once their holder
    lets go they are evicted like any other."""
    store = Store([disk(cache_dir, 6 * SMALL)])
    removed = removals(store)
    pinned = [fill(store, f"p{i}", pin="job:a") for i in range(2)]
    for i in range(20):
        fill(store, f"n{i}")
    assert len(removed) >= 16
    for obj in pinned:
        assert obj.id not in removed
        assert store.get(obj.id) is obj
        assert store.verify(obj) == []
    assert_pinned_bytes_hold(store)

    store.unpin("job:a")
    assert store.pinned_bytes(store.tier("disk")) == 0
    for i in range(20, 30):
        fill(store, f"n{i}")
    for obj in pinned:
        assert obj.id in removed
        assert store.get(obj.id) is None
        assert not obj.directory.exists()


def test_busy_objects_are_skipped(cache_dir: Path) -> None:
    """An object in use is never evicted: the next least recently used goes instead.
    Released, it can be evicted again."""
    store = Store([disk(cache_dir, 4 * SMALL)])
    removed = removals(store)
    oldest, *others = [fill(store, f"o{i}") for i in range(4)]
    with store.in_use(oldest):
        fill(store, "n0")
        fill(store, "n1")
        assert removed == [others[0].id, others[1].id]
        assert store.get(oldest.id) is oldest
        with store.in_use(others[2]):  # every old one left is busy: a new one goes
            fill(store, "n2")
            assert removed[2] == header("n0").id
    assert store.get(oldest.id) is oldest
    for i in range(3, 8):
        fill(store, f"n{i}")
    assert oldest.id in removed and others[2].id in removed
    assert store.get(oldest.id) is None


def test_pinned_bytes_follow_pins_unpins_evictions_and_restarts(tmp_path: Path) -> None:
    """Each tier's pinned bytes are the footprints of its pinned objects, at every step."""
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    tiers = [disk(fast, 4 * PAIR, name="fast"), disk(slow, 8 * PAIR, name="slow")]
    store = Store(tiers)
    assert_pinned_bytes_hold(store)

    a = fill(store, "a", blocks=2, pin="job:a", tier="fast")
    b = fill(store, "b", blocks=2, pin="job:a", tier="slow")
    assert store.place(b.header, pin_holder="job:b") is b  # a second holder: counted once
    c = fill(store, "c", pin="job:b", tier="slow")
    d = fill(store, "d", tier="slow")
    assert_pinned_bytes_hold(store)
    assert store.pinned_bytes(store.tier("fast")) == PAIR
    assert store.pinned_bytes(store.tier("slow")) == PAIR + SMALL

    store.place(d.header, pin_holder="job:c")  # pinning an object already cached
    assert_pinned_bytes_hold(store)
    store.unpin("job:a", [b.id])  # job:b still holds b
    assert store.holders(b.id) == ["job:b"]
    assert_pinned_bytes_hold(store)
    store.unpin("job:a")
    assert not store.is_pinned(a.id)
    assert store.pinned_bytes(store.tier("fast")) == 0
    assert_pinned_bytes_hold(store)

    removed = removals(store)
    for i in range(12):  # evictions all round the pinned ones
        fill(store, f"n{i}", blocks=2, tier="slow")
        assert_pinned_bytes_hold(store)
    assert removed and not {b.id, c.id, d.id} & set(removed)

    store.retire(c)  # gone from the cache (say, found corrupt), still pinned
    assert store.holders(c.id) == ["job:b"]
    assert_pinned_bytes_hold(store)
    assert store.pinned_bytes(store.tier("slow")) == PAIR + SMALL  # b and d
    fill(store, "c", pin="job:b", tier="slow")
    assert_pinned_bytes_hold(store)

    figures = [store.pinned_bytes(t) for t in store.tiers]
    fresh = Store(tiers)
    assert_pinned_bytes_hold(fresh)
    assert [fresh.pinned_bytes(t) for t in fresh.tiers] == figures
    fresh.unpin("job:b")
    fresh.unpin("job:c")
    assert [fresh.pinned_bytes(t) for t in fresh.tiers] == [0, 0]
    assert_pinned_bytes_hold(fresh)


def test_holders_index_agrees_with_persisted_pins_after_restart(cache_dir: Path) -> None:
    """After pins and partial unpins, a fresh store answers ``holders`` and
    ``is_pinned`` exactly as the pin files on disk say, for every object."""
    store = Store([disk(cache_dir, 32 * SMALL)])
    claims = {
        "job:a": ["o0", "o1", "o2"],
        "job:b": ["o1", "o3"],
        "csi:vol-1": ["o2", "o3", "o4"],
        "user:x": ["o4", "o6"],
    }
    for holder, names in claims.items():
        for name in names:
            fill(store, name, pin=holder)
    fill(store, "o5")
    fill(store, "o7")
    store.unpin("job:a", [header("o0").id])
    store.unpin("csi:vol-1")
    store.unpin("user:x", [header("o6").id, header("o5").id])  # o5: never its pin

    on_disk = pins_on_disk(cache_dir)
    assert on_disk == {
        "job:a": sorted([header("o1").id, header("o2").id]),
        "job:b": sorted([header("o1").id, header("o3").id]),
        "user:x": [header("o4").id],
    }
    fresh = Store([disk(cache_dir, 32 * SMALL)])
    assert fresh.pins() == on_disk
    by_object: dict[str, list[str]] = {}
    for holder, ids in on_disk.items():
        for object_id_ in ids:
            by_object.setdefault(object_id_, []).append(holder)
    for i in range(8):
        object_id_ = header(f"o{i}").id
        assert fresh.get(object_id_) is not None
        assert fresh.holders(object_id_) == sorted(by_object.get(object_id_, []))
        assert fresh.is_pinned(object_id_) == (object_id_ in by_object)
    assert_pinned_bytes_hold(fresh)


def test_eviction_storm_stays_within_quota(cache_dir: Path) -> None:
    """Thousands of small objects from four threads through a tier that holds 64:
    usage never passes the quota, the books balance and what stays is intact."""
    store = Store([disk(cache_dir, 64 * SMALL)])
    tier = store.tier("disk")
    pinned = [fill(store, f"pinned{i}", pin="job:keep") for i in range(8)]
    samples: list[int] = []
    lock = threading.Lock()

    def sample() -> None:
        (usage,) = store.usage()
        with lock:
            samples.append(usage.used + usage.reserved)

    def worker(first: int, count: int) -> int:
        rng = random.Random(first)
        cached = 0
        for i in range(first, first + count):
            obj = store.place(header(f"s{i}"))
            sample()
            assert obj is not None  # the pinned ones leave room
            with store.in_use(obj):
                if store.write_block(obj, 0, memoryview(payload(f"s{i}", 0))):
                    cached += 1
                else:  # evicted between placing and writing: like a fill, uncached
                    assert obj.retired
            sample()
            earlier = store.get(header(f"s{rng.randrange(first, i + 1)}").id)
            if earlier is not None:
                store.pread(earlier, 0, BLOCK)
        return cached

    threads, each = 4, 800
    with ThreadPoolExecutor(threads) as pool:
        cached = sum(pool.map(worker, range(0, threads * each, each), [each] * threads))

    assert cached > threads * each * 0.9
    assert max(samples) <= tier.quota
    assert tier.high_water <= tier.quota
    assert tier.used + tier.reserved <= tier.quota
    assert tier.reserved == 0
    assert tier.used == sum(o.charged for o in tier.objects.values())
    # Every object placed is still there or was evicted (the tier was full throughout).
    assert tier.evictions == threads * each - (len(tier.objects) - len(pinned))
    on_disk = {p.name for p in layout.objects_dir(cache_dir).glob("*/*") if p.is_dir()}
    assert on_disk == set(tier.objects)
    for obj in pinned:
        assert store.get(obj.id) is obj
    for obj in tier.objects.values():
        assert store.verify(obj) == []
        name = obj.header.url.rsplit("/", 1)[1]
        assert xxhash.xxh3_64_intdigest(payload(name, 0)) == obj.present[0]
    assert_pinned_bytes_hold(store)


def _version(name: str, version: str) -> ObjectHeader:
    url = f"file:///origin/{name}"
    return ObjectHeader(object_id(url, version), url, version, BLOCK, BLOCK)


def _fill_header(store: Store, head: ObjectHeader) -> CachedObject:
    obj = store.place(head)
    assert obj is not None
    with store.in_use(obj):
        assert store.write_block(obj, 0, memoryview(payload(head.id, 0)))
    return obj


def test_superseded_versions_are_evicted_first(cache_dir: Path) -> None:
    """A version the origin replaced goes before any current object, however recently
    it was read; a stat decides which version is current, back and forth."""
    store = Store([disk(cache_dir, 3 * SMALL)])
    removed = removals(store)
    old = _fill_header(store, _version("a", "v1"))
    other = fill(store, "b")
    store.note_current(old.header.url, old.id)
    assert store.pread(old, 0, BLOCK)  # read last: the most recent of the two
    moved_on = _version("a", "v2")
    store.note_current(moved_on.url, moved_on.id)  # a stat finds the origin moved on
    assert old.superseded
    new = _fill_header(store, moved_on)
    assert not new.superseded
    assert store.pread(old, 0, BLOCK)  # a reader of the old version does not bring it back
    fill(store, "c")  # one object must go: the superseded one, not b
    assert removed == [old.id]
    assert store.get(other.id) is not None and store.get(new.id) is not None

    # The origin reverted: the stat marks v2 superseded, and v1 fetched again takes
    # its room first.
    reverted = _version("a", "v1")
    store.note_current(reverted.url, reverted.id)
    assert new.superseded
    again = _fill_header(store, reverted)
    assert not again.superseded
    assert removed[1:] == [new.id]


def test_after_a_restart_the_version_cached_last_is_taken_for_current(cache_dir: Path) -> None:
    store = Store([disk(cache_dir, 8 * SMALL)])
    old = _fill_header(store, _version("a", "v1"))
    os.utime(old.meta_path, (1_000_000_000, 1_000_000_000))  # written long before
    new = _fill_header(store, _version("a", "v2"))
    store.release_directories()
    fresh = Store([disk(cache_dir, 8 * SMALL)])
    loaded = {o.id: o.superseded for o in fresh.objects()}
    assert loaded == {old.id: True, new.id: False}
