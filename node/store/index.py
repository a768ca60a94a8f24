"""The index on disk: opening a tier root, recovery at start, object directories.

A restart trusts nothing but the meta files: the index is rebuilt from them, and
what cannot be trusted (an unparsable meta file, a data file grown past its size,
a directory named for another object) is retired into ``trash/``, which is emptied
on start. A new object directory is built under a staging name and renamed into
place, so a crash never leaves a half-made object where one is looked up; if
another process on the same cache directory got there first, its directory is
adopted (same id, same URL and version, same bytes). Only files and the ``Tier``
records here: the Store adds what is loaded to its index under its lock.
"""

from __future__ import annotations

import errno
import gc
import grp
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cachefs.errors import CacheDirError
from cachefs.node import layout
from cachefs.node.config import TierConfig, default_quota
from cachefs.node.faults import crash_point
from cachefs.node.layout import ObjectHeader
from cachefs.node.store import ownership
from cachefs.node.store.objects import CachedObject, Tier, block_charge
from cachefs.node.store.ownership import EMBEDDED, Owner
from cachefs.urls import object_id

ROOT_MODE = 0o700
GROUP_ROOT_MODE = 0o750
STALE_TMP_SECONDS = 3600
# Threads reading object directories at start when the disk is cold, and what
# makes it cold: reading one directory from the page cache took 25 us here, from a
# cold disk 180 us (4 threads: 100 us each).
_LOAD_THREADS = 4
_COLD_READ_SECONDS = 60e-6
log = logging.getLogger("cachefs.store")


def resolve_group(group: str) -> int:
    """The gid of ``group`` (a name or a number)."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ValueError(f"group {group!r} does not exist on this host") from exc


def open_tier(config: TierConfig, gid: int | None, owner: Owner = EMBEDDED) -> Tier:
    """The tier at ``config.path``, claimed for ``owner`` (see ``ownership``), its
    directories made (modes fixed) and trash emptied.

    Its index is empty: ``rebuild`` loads it.
    """
    root = config.path
    _warn_if_not_memory(config)
    try:
        layout.make_parents(root)
        root.mkdir(exist_ok=True)
        if gid is not None:
            os.chown(root, -1, gid)
            os.chmod(root, GROUP_ROOT_MODE)
        else:
            os.chmod(root, ROOT_MODE)
        layout.check_format(root)  # a root of another format is left as it is
        claim = ownership.claim(root, owner)
    except CacheDirError:
        raise
    except OSError as exc:
        raise _unusable(config, exc) from exc
    try:
        for sub in (
            root / "v1",  # created first, so its mode does not depend on the umask
            layout.objects_dir(root),
            layout.trash_dir(root),
            layout.pins_dir(root),
            layout.views_dir(root),
        ):
            sub.mkdir(parents=True, exist_ok=True)
            os.chmod(sub, layout.DIR_MODE)
        probe = root / "v1" / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        quota = config.quota if config.quota is not None else default_quota(root)
        shutil.rmtree(layout.trash_dir(root), ignore_errors=True)
        layout.trash_dir(root).mkdir(mode=layout.DIR_MODE, exist_ok=True)
    except BaseException as exc:
        claim.release()
        if isinstance(exc, OSError) and not isinstance(exc, CacheDirError):
            raise _unusable(config, exc) from exc
        raise
    return Tier(config=config, quota=quota, claim=claim)


def _unusable(config: TierConfig, exc: OSError) -> CacheDirError:
    return CacheDirError(
        f"cannot use cache directory {config.path} for tier {config.name!r}: "
        f"{exc.strerror or exc}; point CACHEFS_CACHE_DIR (or the tier's path in the "
        "config) at a writable directory"
    )


def rebuild(tier: Tier) -> list[CachedObject]:
    """Every object on disk in ``tier``, least recently used (oldest meta file) first.

    What cannot be trusted is retired on the way. A cache of 100 000 objects is
    loaded at every start (measured in ``bench/scale_bench.py``): paths are plain
    strings, since pathlib's per-path work was most of a warm start; the garbage
    collector waits, since its passes over the growing index were a third of the
    rest; and a cold disk is read by a few threads (on a warm one their contention
    for the GIL made reading twice as slow, so the first shard's pace decides).
    """
    with os.scandir(layout.objects_dir(tier.root)) as listing:
        shards = [entry.path for entry in listing if entry.is_dir()]
    if not shards:
        return []
    loaded: list[CachedObject] = []
    with _gc_paused():
        started = time.monotonic()
        found = _read_shard(shards[0])
        cold = time.monotonic() - started > _COLD_READ_SECONDS * max(len(found), 1)
        _build_shard(tier, shards[0], found, loaded)
        if not cold:
            for shard in shards[1:]:
                _build_shard(tier, shard, _read_shard(shard), loaded)
        else:
            with ThreadPoolExecutor(_LOAD_THREADS, thread_name_prefix="cachefs-load") as pool:
                for first in range(1, len(shards), _LOAD_THREADS):
                    batch = shards[first : first + _LOAD_THREADS]
                    # Read a batch, then build it: readers waiting for the GIL behind
                    # the building thread would leave the disk idle.
                    for shard, found in zip(batch, pool.map(_read_shard, batch), strict=True):
                        _build_shard(tier, shard, found, loaded)
    loaded.sort(key=lambda o: o.last_used)
    return loaded


def _build_shard(
    tier: Tier, shard: str, found: list[tuple[str, _OnDisk | None]], loaded: list[CachedObject]
) -> None:
    """Add the objects read from ``shard`` to ``loaded``; retire the untrustworthy."""
    for name, on_disk in found:
        if on_disk is _CREATING:
            continue  # another process is creating it right now
        directory = os.path.join(shard, name)
        obj = _build(tier, directory, name, on_disk)
        if obj is None:
            retire_directory(tier, Path(directory))
        else:
            loaded.append(obj)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No collection while the index is built: every pass would walk all of it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_object(tier: Tier, directory: Path) -> CachedObject | None:
    """The object in ``directory`` as its meta file vouches for it; None if untrustworthy."""
    path = os.fspath(directory)
    return _build(tier, path, directory.name, _read_object(path))


@dataclass(frozen=True)
class _OnDisk:
    """What one object directory holds, as read: the meta file, its mtime (the
    object's last use) and the data file's stat."""

    raw: bytes
    used: float
    data: os.stat_result


_CREATING = _OnDisk(b"", 0.0, os.stat_result((0,) * 10))  # a fresh staging directory


def _read_shard(shard: str) -> list[tuple[str, _OnDisk | None]]:
    """Every directory of a shard, read (None: unreadable, so untrustworthy)."""
    found = []
    for name in os.listdir(shard):
        directory = f"{shard}/{name}"
        if name.startswith(".new-") and not _stale(Path(directory)):
            found.append((name, _CREATING))
        else:
            found.append((name, _read_object(directory)))
    return found


def _read_object(directory: str) -> _OnDisk | None:
    """One object directory's files, stale temporary files removed on the way: one
    listing, one open of the meta file and one stat of the data file."""
    try:
        leftovers = [name for name in os.listdir(directory) if name.endswith(".tmp")]
    except OSError:
        return None  # not a directory (a stray file), or gone
    for name in leftovers:
        leftover = f"{directory}/{name}"
        if _stale(Path(leftover)):
            with suppress(OSError):
                os.unlink(leftover)
    try:
        fd = os.open(f"{directory}/meta", os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            raw = os.read(fd, st.st_size + 1)  # a short read is the end of a regular file
            if len(raw) > st.st_size:  # appended to since the fstat: read on to the end
                chunks = [raw]
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
                raw = b"".join(chunks)
        finally:
            os.close(fd)
        return _OnDisk(raw, st.st_mtime, os.stat(f"{directory}/data"))
    except OSError:
        return None


def _build(tier: Tier, directory: str, name: str, on_disk: _OnDisk | None) -> CachedObject | None:
    """The object ``on_disk`` holds, as its meta file vouches for it; None if
    untrustworthy."""
    if on_disk is None:
        return None
    raw, used, data = on_disk.raw, on_disk.used, on_disk.data
    try:
        header, blocks = layout.parse_meta(raw)
    except (ValueError, TypeError):
        return None
    if header.id != name or object_id(header.url, header.version) != header.id:
        return None
    if data.st_size > header.size:
        return None  # grown past its size: never hand it out, and never trim it in place
    if data.st_size < header.size:  # cut short: only the blocks past the cut are lost
        blocks = {i: c for i, c in blocks.items() if header.block_span(i)[1] <= data.st_size}
    if not raw.endswith(b"\n"):  # end a torn record, or it swallows the next one
        meta_path = os.path.join(directory, "meta")
        with suppress(OSError), open(meta_path, "ab") as meta:
            meta.write(b"\n")
        try:
            used = os.stat(meta_path).st_mtime
        except OSError:
            return None
    return CachedObject(
        header=header,
        tier=tier,
        present=blocks,
        digest_ok=layout.verified_record(raw, header, blocks),  # a restart does not check again
        charged=layout.PAGE + sum(block_charge(header, i) for i in blocks),
        last_used=used,
        inode=data.st_ino,
    )


def create_directory(tier: Tier, header: ObjectHeader) -> int | None:
    """A new object directory (empty sparse data file, header-only meta); its data inode.

    Built under a staging name and renamed into place. None if another process on
    the same cache directory created it first. Raises OSError (ENOSPC too) and then
    leaves nothing behind.
    """
    final = layout.object_dir(tier.root, header.id)
    staging = final.parent / f".new-{header.id}-{uuid.uuid4().hex[:8]}"
    try:
        final.parent.mkdir(mode=layout.DIR_MODE, parents=True, exist_ok=True)
        os.chmod(final.parent, layout.DIR_MODE)
        staging.mkdir(mode=layout.DIR_MODE)
        os.chmod(staging, layout.DIR_MODE)
        fd = os.open(staging / "data", os.O_RDWR | os.O_CREAT | os.O_EXCL, layout.FILE_MODE)
        try:
            os.fchmod(fd, layout.FILE_MODE)
            os.ftruncate(fd, header.size)
        finally:
            os.close(fd)
        layout.write_file_atomic(staging / "meta", layout.encode_header(header))
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return None
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return (final / "data").stat().st_ino


def retire_directory(tier: Tier, directory: Path) -> None:
    """Rename ``directory`` into the tier's trash, then delete it (a crash: on start)."""
    with suppress(OSError):
        remove_trashed(trash_directory(tier, directory))


def trash_directory(tier: Tier, directory: Path) -> Path | None:
    """Rename ``directory`` into the tier's trash: where it is now, or None if it was
    gone already. Raises OSError when the rename fails otherwise (a failing disk)."""
    target = layout.trash_dir(tier.root) / f"{directory.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(directory, target)
    except FileNotFoundError:
        return None
    crash_point("mid-eviction")
    return target


def remove_trashed(target: Path | None) -> None:
    """Delete what ``trash_directory`` moved (what is left, a start empties the trash)."""
    if target is None:
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
    else:  # a stray file where an object directory belongs
        with suppress(OSError):
            target.unlink()


def _stale(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > STALE_TMP_SECONDS
    except OSError:
        return False


def _filesystem_type(path: Path) -> str | None:
    """The type (from /proc/mounts) of the filesystem holding ``path``."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    probe = path.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            target = fields[1].replace("\\040", " ")
            inside = str(probe) == target or str(probe).startswith(target.rstrip("/") + "/")
            if inside and len(target) >= len(best):
                best, kind = target, fields[2]
    return kind


def _warn_if_not_memory(config: TierConfig) -> None:
    if config.medium != "memory":
        return
    kind = _filesystem_type(config.path)
    if kind is not None and kind not in ("tmpfs", "ramfs", "hugetlbfs"):
        log.warning(
            "tier %r is a memory tier but %s is on %s, not tmpfs: it will run at disk speed",
            config.name,
            config.path,
            kind,
        )
