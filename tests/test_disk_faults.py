"""Disk faults injected for real: a tier stands on a FUSE filesystem that fails or
holds the operations a test names (tests/fault_fs.py), or on a tmpfs with a few
inodes, under real nodes and engines reading a real S3 origin.

What each shows: a block the disk cannot read is dropped and fetched again; write
errors, repeated, degrade the tier (metric, log) and new data goes to the next tier
or is served uncached; a disk that hangs holds up only the reads that touch it,
and past the deadline not even those; a filesystem out of inodes gives an error
that says so, and loses nothing.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import NodeProcess, run_cli
from fault_fs import FaultFS, unavailable
from helpers import Background
from servers import S3Bucket, wait_for

from cachefs.client import NodeClient
from cachefs.errors import QuotaExceededError
from cachefs.node import layout
from cachefs.node.engine import Engine
from cachefs.node.store import health

BLOCK = 256 * 1024
SMALL_BLOCK = 64 * 1024
OBJECT_DATA = "cache/v1/objects/*/*/data"


def _engine(make_engine: Callable[..., Engine], tiers: list[dict[str, Any]]) -> Engine:
    """An engine over ``tiers`` (64 KiB blocks), from the shared engine factory."""
    return make_engine(cache_dir=None, tiers=tiers, block_size=SMALL_BLOCK, concurrency=4)


@pytest.fixture
def faulty(
    tmp_path: Path, start_node: Callable[..., NodeProcess], make_engine: Any
) -> Iterator[FaultFS]:
    """A FaultFS mount for a tier to stand on. It asks for the node and engine
    factories so that it is torn down before them: whatever a failed test left held
    is answered before nodes are killed and engines closed."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    backing = tmp_path / "faulty-backing"
    backing.mkdir()
    fs = FaultFS(backing, tmp_path / "faulty").mount()
    yield fs
    fs.close()
    assert fs.internal_errors == []


def _tiers(fs: FaultFS, tmp_path: Path) -> list[dict[str, Any]]:
    """A tier on the faulty filesystem, then a healthy one."""
    return [
        {"name": "fast", "path": str(fs.mountpoint / "cache"), "medium": "disk", "quota": "64MiB"},
        {"name": "disk", "path": str(tmp_path / "disk-cache"), "medium": "disk", "quota": "64MiB"},
    ]


def _node(
    start_node: Callable[..., NodeProcess], tmp_path: Path, tiers: list[dict[str, Any]]
) -> tuple[NodeProcess, NodeClient]:
    """A node over ``tiers`` (256 KiB blocks, no scrubber: nothing reads behind the
    test's back), and a client of it."""
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"block_size": BLOCK, "tiers": tiers, "scrub": {"rate": 0}}))
    node = start_node(tmp_path / "unused", config=config)
    return node, NodeClient(node.unix_endpoint)


def _read(client: NodeClient, url: str) -> bytes:
    """Every byte of ``url`` through the node (gRPC: never the client's own file read)."""
    info = client.stat(url)
    return client.read(info, 0, info.size)


def _logged(node: NodeProcess, text: str) -> bool:
    return any(text in line for line in list(node.lines))


# -- reads -------------------------------------------------------------------------


def test_a_read_error_drops_that_block_and_fetches_it_again(
    s3: S3Bucket, faulty: FaultFS, start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """EIO on one block of a cached object: that block alone comes from the origin
    again, the reader gets every byte right, the error is counted, and one bad block
    does not degrade the tier."""
    node, client = _node(start_node, tmp_path, _tiers(faulty, tmp_path))
    data = os.urandom(4 * BLOCK)
    s3.put("model/a.bin", data)
    url = s3.url("model/a.bin")
    client.prefetch([url], tier="fast")
    (entry,) = client.cached(url)
    assert (entry.tier, entry.complete) == ("fast", True)
    data_file = layout.object_dir(faulty.backing / "cache", entry.id) / "data"
    # A bad sector inside block 2 of this very file.
    faulty.fail_reads(inode=data_file.stat().st_ino, offset=2 * BLOCK + 100, length=1)
    s3.reset_requests()

    assert _read(client, url) == data
    assert s3.gets("model/a.bin") == [(2 * BLOCK, 3 * BLOCK - 1)]
    assert faulty.injected["read"] >= 1
    assert node.metric("cachefs_tier_io_errors_total", tier="fast", operation="read") == 1
    assert node.metric("cachefs_tier_degraded", tier="fast") == 0
    assert _logged(node, "could not be read from the disk")
    (entry,) = client.cached(url)
    assert (entry.tier, entry.complete) == ("fast", True)  # whole again, in a new file

    s3.reset_requests()
    assert _read(client, url) == data
    assert s3.gets("model/a.bin") == []
    assert node.metric("cachefs_tier_io_errors_total", tier="fast", operation="read") == 1


# -- writes ------------------------------------------------------------------------


@pytest.mark.parametrize("error", [errno.EIO, errno.EROFS], ids=["EIO", "EROFS"])
def test_repeated_write_errors_degrade_the_tier_and_new_data_goes_to_the_next(
    s3: S3Bucket,
    faulty: FaultFS,
    start_node: Callable[..., NodeProcess],
    tmp_path: Path,
    error: int,
) -> None:
    """Blocks the disk refuses are served uncached; after a few errors the tier is
    degraded (metric, log) and new objects, and incomplete ones nobody holds, are
    cached in the next tier."""
    node, client = _node(start_node, tmp_path, _tiers(faulty, tmp_path))
    objects = {f"model/w{i}.bin": os.urandom(2 * BLOCK) for i in range(3)}
    for key, data in objects.items():
        s3.put(key, data)
    faulty.fail_writes(OBJECT_DATA, error=error)

    for key, data in objects.items():
        assert _read(client, s3.url(key)) == data
    errors = node.metric("cachefs_tier_io_errors_total", tier="fast", operation="write")
    assert errors >= health.DEGRADE_AFTER
    assert node.metric("cachefs_tier_degraded", tier="fast") == 1
    assert node.metric("cachefs_tier_degraded", tier="disk") == 0
    assert node.metric("cachefs_uncached_bytes_total") > 0
    assert _logged(node, "'fast'") and _logged(node, "is degraded")
    assert not any(e.tier == "fast" and e.complete for e in client.cached())
    # cachefs status, as a user runs it, says which tier and why.
    status = run_cli("--endpoint", node.unix_endpoint, "status")
    fast_line = next(line for line in status.stdout.splitlines() if line.startswith("tier fast"))
    assert "; DEGRADED: " in fast_line and "DEGRADED" not in status.stdout.replace(fast_line, "")

    s3.put("model/new.bin", new := os.urandom(3 * BLOCK))
    first = s3.url("model/w0.bin")
    client.prefetch([first, s3.url("model/new.bin")])
    tiers = {e.url: (e.tier, e.complete) for e in client.cached()}
    assert tiers[s3.url("model/new.bin")] == ("disk", True)
    assert tiers[first] == ("disk", True)  # left the degraded tier
    s3.reset_requests()
    assert _read(client, s3.url("model/new.bin")) == new
    assert _read(client, first) == objects["model/w0.bin"]
    assert s3.gets("model/new.bin") == [] and s3.gets("model/w0.bin") == []


# -- hangs -------------------------------------------------------------------------


def test_a_hung_disk_holds_up_only_the_reads_that_touch_it(
    s3: S3Bucket, faulty: FaultFS, start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """A read, a new object's directory and an eviction each hang on the faulty tier;
    meanwhile reads of the other tier, and of other objects of the same tier, are
    answered. Released, each hung call finishes with the right result."""
    node, client = _node(start_node, tmp_path, _tiers(faulty, tmp_path))
    payloads = {key: os.urandom(2 * BLOCK) for key in ("x", "y", "z")}
    for key, data in payloads.items():
        s3.put(f"model/{key}.bin", data)
    url = {key: s3.url(f"model/{key}.bin") for key in payloads}
    client.prefetch([url["x"]], tier="fast")
    client.prefetch([url["y"]], tier="disk")
    (x,) = client.cached(url["x"])

    def others_answer(*keys: str) -> None:
        for key in keys:
            assert Background(lambda key=key: _read(client, url[key])).join() == payloads[key]

    # 1. The data file of x stops answering reads.
    faulty.hang(f"cache/v1/objects/{x.id[:2]}/{x.id}/data")
    hung = Background(lambda: _read(client, url["x"]))
    faulty.wait_held(1)
    others_answer("y")
    assert not hung.done.is_set() and len(faulty.held()) == 1
    faulty.release()
    assert hung.join() == payloads["x"]

    # 2. Making a new object's directory in the faulty tier hangs.
    faulty.hang("cache/v1/objects/*", ("mkdir",))
    hung = Background(lambda: _read(client, url["z"]))
    faulty.wait_held(1)
    others_answer("y", "x")
    assert not hung.done.is_set()
    faulty.release()
    assert hung.join() == payloads["z"]

    # 3. An eviction's move to the trash hangs.
    faulty.hang("cache/v1/objects/*", ("rename",))
    hung = Background(lambda: client.evict([url["x"]]))
    faulty.wait_held(1)
    others_answer("y")
    assert not hung.done.is_set()
    faulty.release()
    assert hung.join().objects == 1
    assert client.cached(url["x"]) == []
    assert node.metric("cachefs_tier_degraded", tier="fast") == 0  # none past the deadline


def test_past_the_deadline_readers_of_a_hung_disk_are_served_from_the_origin(
    s3: S3Bucket,
    faulty: FaultFS,
    make_engine: Callable[..., Engine],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One read waits on a disk that hangs; once it has waited past the deadline the
    tier is degraded, and the next readers of the same object get its bytes from the
    origin while the first still waits. When the disk answers again, the first read
    finishes, and a check of the disk brings the tier back."""
    monkeypatch.setattr(health, "IO_DEADLINE", 0.5)
    engine = _engine(make_engine, _tiers(faulty, tmp_path))
    data = os.urandom(3 * SMALL_BLOCK)
    s3.put("model/h.bin", data)
    url = s3.url("model/h.bin")
    engine.prefetch([url], tier="fast")
    obj = engine.store.get(engine.stat(url).id)
    assert obj is not None and obj.complete

    faulty.hang(f"cache/v1/objects/{obj.id[:2]}/{obj.id}/data")
    first = Background(lambda: engine.read(url))
    faulty.wait_held(1)
    fast = wait_for(
        lambda: next((h for h in engine.store.health() if h.tier == "fast" and h.stalled), None),
        message="the hung read to pass the deadline",
    )
    assert fast.degraded and "hangs" in fast.reason
    s3.reset_requests()
    assert Background(lambda: engine.read(url)).join() == data
    assert len(s3.gets("model/h.bin")) == 3  # every block, from the origin
    assert not first.done.is_set() and len(faulty.held()) == 1
    assert "degraded" in engine.store.trouble()

    faulty.release()
    assert first.join() == data
    monkeypatch.setattr(health, "RECHECK_SECONDS", 0.0)
    wait_for(
        lambda: not next(h for h in engine.store.health() if h.tier == "fast").degraded,
        message="the disk check to bring the tier back",
    )
    s3.put("model/after.bin", after := os.urandom(SMALL_BLOCK))
    assert engine.read(s3.url("model/after.bin")) == after
    placed = engine.store.get(engine.stat(s3.url("model/after.bin")).id)
    assert placed is not None and placed.tier.name == "fast" and placed.complete


def test_a_reader_waiting_on_a_fill_that_hangs_fetches_the_block_itself(
    s3: S3Bucket,
    faulty: FaultFS,
    make_engine: Callable[..., Engine],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Single flight joins readers to the fill of a block; when that fill's write
    hangs past the deadline, a joined reader fetches the block itself, uncached."""
    monkeypatch.setattr(health, "IO_DEADLINE", 0.5)
    engine = _engine(make_engine, _tiers(faulty, tmp_path))
    data = os.urandom(SMALL_BLOCK)
    s3.put("model/one.bin", data)
    url = s3.url("model/one.bin")
    faulty.hang(OBJECT_DATA, ("write",))

    first = Background(lambda: engine.read(url))
    faulty.wait_held(1)
    wait_for(
        lambda: any(h.stalled for h in engine.store.health()),
        message="the hung write to pass the deadline",
    )
    assert Background(lambda: engine.read(url)).join() == data
    assert len(s3.gets("model/one.bin")) == 2  # the hung fill's, and the second reader's
    assert not first.done.is_set()
    faulty.release()
    assert first.join() == data


# -- inodes ------------------------------------------------------------------------


@pytest.fixture
def inode_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Factory mounting a 64 MiB tmpfs with ``nr_inodes`` inodes; unmounted at
    teardown. Skips where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(nr_inodes: int) -> Path:
        target = tmp_path / f"inodes-{len(mounted)}"
        target.mkdir()
        options = f"size=64m,nr_inodes={nr_inodes},mode=0755"
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True, capture_output=True)


def _fill_inodes(directory: Path) -> list[Path]:
    """Files in ``directory`` until its filesystem has no inode left."""
    made = []
    while True:
        path = directory / f"filler-{len(made)}"
        try:
            path.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return made
        made.append(path)


def test_inode_exhaustion_says_what_is_full_and_loses_nothing(
    s3: S3Bucket,
    start_node: Callable[..., NodeProcess],
    inode_tmpfs: Callable[[int], Path],
    tmp_path: Path,
) -> None:
    """A tier on a filesystem with no inode left: a prefetch fails with an error that
    names the filesystem, the inodes and the remedies; a read is served uncached; the
    objects cached before stay whole, pinned and readable without the origin, also
    after a restart; with inodes free again the prefetch works."""
    mount = inode_tmpfs(200)
    tiers = [{"name": "disk", "path": str(mount / "cache"), "medium": "disk", "quota": "32MiB"}]
    node, client = _node(start_node, tmp_path, tiers)
    kept = {f"model/k{i}.bin": os.urandom(2 * BLOCK) for i in range(2)}
    for key, data in kept.items():
        s3.put(key, data)
    client.prefetch([s3.url(key) for key in kept], pin="job:keep")
    s3.put("model/c.bin", late := os.urandom(2 * BLOCK))
    objects = layout.objects_dir(mount / "cache")
    before = {p: p.read_bytes() for p in objects.glob("*/*/meta")}
    fillers = _fill_inodes(mount)
    assert os.statvfs(mount).f_favail == 0

    with pytest.raises(QuotaExceededError) as caught:
        client.prefetch([s3.url("model/c.bin")])
    message = str(caught.value)
    assert "no free inodes" in message and str(mount / "cache") in message
    assert "nr_inodes" in message and "'disk'" in message
    with pytest.raises(QuotaExceededError, match=r"cannot record the pins of job:new: .*inodes"):
        client.prefetch([s3.url("model/c.bin")], pin="job:new")
    assert client.status().pins == {"job:keep": 2}  # no pin left half made
    assert _read(client, s3.url("model/c.bin")) == late  # served uncached
    assert _logged(node, "no free inodes")

    def kept_intact() -> None:
        entries = {e.url: e for e in client.cached()}
        s3.reset_requests()
        for key, data in kept.items():
            entry = entries[s3.url(key)]
            assert entry.complete and entry.pinned_by == ("job:keep",)
            assert _read(client, s3.url(key)) == data
            assert s3.gets(key) == []
        assert {p: p.read_bytes() for p in objects.glob("*/*/meta")} == before
        assert not list(objects.glob("*/.new-*"))

    kept_intact()
    for path in fillers:
        path.unlink()
    node.kill()
    node, client = _node(start_node, tmp_path, tiers)
    kept_intact()
    client.prefetch([s3.url("model/c.bin")])
    (entry,) = client.cached(s3.url("model/c.bin"))
    assert entry.complete
