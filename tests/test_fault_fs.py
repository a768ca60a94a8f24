"""The fault-injecting filesystem the disk-fault tests stand a tier on: it passes the
store's operations through, fails and holds exactly what it is told, and unmounts
whatever a test left behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fault_fs import FaultFS, unavailable
from helpers import Background

MountFactory = Callable[[], FaultFS]


@pytest.fixture
def mount_fault_fs(tmp_path: Path) -> Iterator[MountFactory]:
    """Factory of FaultFS mounts under ``tmp_path``, each over a backing directory of
    its own; every one is unmounted at teardown."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    mounted: list[FaultFS] = []

    def mount() -> FaultFS:
        backing = tmp_path / f"backing-{len(mounted)}"
        backing.mkdir()
        fs = FaultFS(backing, tmp_path / f"mount-{len(mounted)}").mount()
        mounted.append(fs)
        return fs

    yield mount
    for fs in reversed(mounted):
        fs.close()


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == str(path) for line in f)


def test_every_operation_the_store_makes_passes_through(mount_fault_fs: MountFactory) -> None:
    """Directories, files, writes at offsets, renames over files, links, modes, sizes,
    sparse files, kernel copies and the free-space figures are the backing's."""
    fs = mount_fault_fs()
    top, under = fs.mountpoint, fs.backing
    (top / "v1" / "objects").mkdir(parents=True)
    os.chmod(top / "v1", 0o755)
    fd = os.open(top / "v1" / "data", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, 3 << 20)  # sparse, like an object's data file
        assert os.pwrite(fd, b"b" * 5000, 1 << 20) == 5000
        os.fsync(fd)
        assert os.pread(fd, 5000, 1 << 20) == b"b" * 5000
        assert os.pread(fd, 10, 0) == b"\0" * 10
    finally:
        os.close(fd)
    with open(top / "v1" / "meta.tmp", "wb") as f:
        f.write(b"header\n")
    with open(top / "v1" / "meta.tmp", "ab") as f:
        f.write(b"b 0 1\n")
    (top / "v1" / "meta").write_bytes(b"old")
    os.replace(top / "v1" / "meta.tmp", top / "v1" / "meta")  # over an existing file
    os.link(top / "v1" / "data", top / "v1" / "objects" / "linked")
    os.rename(top / "v1" / "objects", top / "v1" / "moved")
    source = os.open(top / "v1" / "data", os.O_RDONLY)
    target = os.open(top / "v1" / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(target, 3 << 20)
        assert os.copy_file_range(source, target, 5000, 1 << 20, 1 << 20) == 5000
        os.posix_fallocate(target, 0, 4096)
    finally:
        os.close(source)
        os.close(target)

    assert (under / "v1" / "meta").read_bytes() == b"header\nb 0 1\n"
    assert not (under / "v1" / "meta.tmp").exists()
    assert sorted(os.listdir(top / "v1")) == sorted(os.listdir(under / "v1"))
    assert sorted(os.listdir(top / "v1")) == ["copy", "data", "meta", "moved"]
    assert os.listdir(top / "v1" / "moved") == ["linked"]
    for name in ("data", "meta", "copy", "moved/linked"):
        seen, real = os.stat(top / "v1" / name), os.stat(under / "v1" / name)
        assert (seen.st_ino, seen.st_size, seen.st_mode, seen.st_nlink) == (
            real.st_ino,
            real.st_size,
            real.st_mode,
            real.st_nlink,
        )
    assert os.stat(top / "v1" / "data").st_nlink == 2
    assert (under / "v1" / "copy").read_bytes()[1 << 20 : (1 << 20) + 5000] == b"b" * 5000
    assert os.statvfs(top).f_files == os.statvfs(under).f_files
    os.unlink(top / "v1" / "moved" / "linked")
    os.rmdir(top / "v1" / "moved")
    assert not (under / "v1" / "moved").exists()
    assert os.stat(top / "v1" / "data").st_nlink == 1
    assert fs.internal_errors == []


def test_reads_fail_only_where_and_as_often_as_told(mount_fault_fs: MountFactory) -> None:
    fs = mount_fault_fs()
    data = os.urandom(256 * 1024)
    (fs.mountpoint / "a").write_bytes(data)
    (fs.mountpoint / "b").write_bytes(data)
    fs.fail_reads("a", offset=100_000, length=10, times=2)

    fd = os.open(fs.mountpoint / "a", os.O_RDONLY)
    try:
        assert os.pread(fd, 50_000, 0) == data[:50_000]  # before the bad range
        assert os.pread(fd, 50_000, 100_010) == data[100_010:150_010]  # after it
        for _ in range(2):
            with pytest.raises(OSError) as caught:
                os.pread(fd, 50_000, 80_000)
            assert caught.value.errno == errno.EIO
        assert os.pread(fd, 50_000, 80_000) == data[80_000:130_000]  # both used up
    finally:
        os.close(fd)
    assert (fs.mountpoint / "b").read_bytes() == data
    assert fs.injected["read"] == 2

    rule = fs.fail_reads("*", error=errno.ENXIO)
    with pytest.raises(OSError) as caught:
        (fs.mountpoint / "b").read_bytes()
    assert caught.value.errno == errno.ENXIO
    assert rule.times is None  # until healed
    fs.heal()
    assert (fs.mountpoint / "b").read_bytes() == data


def test_a_fault_can_belong_to_one_file_not_its_name(mount_fault_fs: MountFactory) -> None:
    """A bad sector is in a file, not in a name: the file that replaces it reads fine."""
    fs = mount_fault_fs()
    (fs.mountpoint / "data").write_bytes(b"x" * 10_000)
    fs.fail_reads(inode=os.stat(fs.mountpoint / "data").st_ino)
    with pytest.raises(OSError):
        (fs.mountpoint / "data").read_bytes()
    (fs.mountpoint / "data.new").write_bytes(b"y" * 10_000)
    os.replace(fs.mountpoint / "data.new", fs.mountpoint / "data")
    assert (fs.mountpoint / "data").read_bytes() == b"y" * 10_000


def test_writes_and_directory_operations_fail_with_the_errno_asked(
    mount_fault_fs: MountFactory,
) -> None:
    fs = mount_fault_fs()
    (fs.mountpoint / "objects").mkdir()
    (fs.mountpoint / "data").write_bytes(b"before")
    fs.fail_writes("data")
    fs.fail("objects/*", ("mkdir", "rename"), error=errno.EROFS)

    with pytest.raises(OSError) as caught, open(fs.mountpoint / "data", "r+b") as f:
        f.write(b"after!")
    assert caught.value.errno == errno.EIO
    assert (fs.backing / "data").read_bytes() == b"before"
    with pytest.raises(OSError) as caught:
        (fs.mountpoint / "objects" / "x").mkdir()
    assert caught.value.errno == errno.EROFS
    assert not (fs.backing / "objects" / "x").exists()
    (fs.mountpoint / "y").mkdir()  # outside the pattern
    with pytest.raises(OSError) as caught:
        os.rename(fs.mountpoint / "y", fs.mountpoint / "objects" / "y")  # either name counts
    assert caught.value.errno == errno.EROFS

    fs.heal()
    with open(fs.mountpoint / "data", "r+b") as f:
        f.write(b"after!")
    assert (fs.backing / "data").read_bytes() == b"after!"


def test_a_held_read_waits_while_every_other_request_is_answered(
    mount_fault_fs: MountFactory,
) -> None:
    fs = mount_fault_fs()
    slow, fast = os.urandom(100_000), os.urandom(100_000)
    (fs.mountpoint / "slow").write_bytes(slow)
    (fs.mountpoint / "fast").write_bytes(fast)
    fs.hang("slow")

    held = Background(lambda: (fs.mountpoint / "slow").read_bytes())
    (request,) = fs.wait_held(1)
    assert (request.operation, request.path) == ("read", "slow")
    assert (fs.mountpoint / "fast").read_bytes() == fast  # answered meanwhile
    (fs.mountpoint / "new").mkdir()
    assert not held.done.is_set()
    assert len(fs.held()) == 1

    fs.release()
    assert held.join() == slow
    assert fs.held() == []
    assert (fs.mountpoint / "slow").read_bytes() == slow  # no longer held


def test_a_held_process_is_freed_when_killed(mount_fault_fs: MountFactory) -> None:
    """A caller killed while its request is held goes (the kernel interrupts it): a
    node killed by a test's teardown never waits on a hang nobody releases."""
    fs = mount_fault_fs()
    (fs.mountpoint / "slow").write_bytes(b"s" * 1000)
    fs.hang("slow")
    child = subprocess.Popen(
        [sys.executable, "-c", f"open({str(fs.mountpoint / 'slow')!r}, 'rb').read()"]
    )
    try:
        fs.wait_held(1)
        child.kill()
        assert child.wait(timeout=30) != 0
    finally:
        if child.poll() is None:
            fs.release()
            child.wait(timeout=30)
    assert fs.held() == []


def test_close_answers_held_requests_and_unmounts_a_busy_mount(
    mount_fault_fs: MountFactory,
) -> None:
    fs = mount_fault_fs()
    (fs.mountpoint / "slow").write_bytes(b"s" * 1000)
    busy = os.open(fs.mountpoint, os.O_RDONLY)  # keeps the mount busy: a lazy unmount
    try:
        fs.hang("slow")
        held = Background(lambda: (fs.mountpoint / "slow").read_bytes())
        fs.wait_held(1)
        assert _mounted(fs.mountpoint)
        fs.close()
        assert not _mounted(fs.mountpoint)
        outcome = held.outcome()  # answered: the bytes, or the gone mount's error
        assert outcome == b"s" * 1000 or isinstance(outcome, OSError)
    finally:
        os.close(busy)
    assert (fs.backing / "slow").read_bytes() == b"s" * 1000
    assert not any(t.name.startswith("faultfs-") and t.is_alive() for t in threading.enumerate())
