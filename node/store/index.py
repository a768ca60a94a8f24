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
import grp
import logging
import os
import shutil
import time
import uuid
from contextlib import suppress
from pathlib import Path

from cachefs.errors import CacheDirError
from cachefs.node import layout
from cachefs.node.config import TierConfig, default_quota
from cachefs.node.faults import crash_point
from cachefs.node.layout import ObjectHeader
from cachefs.node.store.objects import CachedObject, Tier, block_charge
from cachefs.urls import object_id

ROOT_MODE = 0o700
GROUP_ROOT_MODE = 0o750
STALE_TMP_SECONDS = 3600
log = logging.getLogger("cachefs.store")


def resolve_group(group: str) -> int:
    """The gid of ``group`` (a name or a number)."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ValueError(f"group {group!r} does not exist on this host") from exc


def open_tier(config: TierConfig, gid: int | None) -> Tier:
    """The tier at ``config.path``, its directories made (modes fixed) and trash emptied.

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
    except OSError as exc:
        raise CacheDirError(
            f"cannot use cache directory {root} for tier {config.name!r}: "
            f"{exc.strerror or exc}; point CACHEFS_CACHE_DIR (or the tier's path in the "
            "config) at a writable directory"
        ) from exc
    quota = config.quota if config.quota is not None else default_quota(root)
    shutil.rmtree(layout.trash_dir(root), ignore_errors=True)
    layout.trash_dir(root).mkdir(mode=layout.DIR_MODE, exist_ok=True)
    return Tier(config=config, quota=quota)


def rebuild(tier: Tier) -> list[CachedObject]:
    """Every object on disk in ``tier``, least recently used (oldest meta file) first.

    What cannot be trusted is retired on the way.
    """
    loaded = []
    for shard in layout.objects_dir(tier.root).iterdir():
        if not shard.is_dir():
            continue
        for directory in shard.iterdir():
            if directory.name.startswith(".new-") and not _stale(directory):
                continue  # another process is creating it right now
            obj = load_object(tier, directory)
            if obj is None:
                retire_directory(tier, directory)
            else:
                loaded.append(obj)
    loaded.sort(key=lambda o: o.last_used)
    return loaded


def load_object(tier: Tier, directory: Path) -> CachedObject | None:
    """The object in ``directory`` as its meta file vouches for it; None if untrustworthy."""
    for leftover in directory.glob("*.tmp"):
        if _stale(leftover):
            with suppress(OSError):
                leftover.unlink()
    try:
        raw = (directory / "meta").read_bytes()
        header, blocks = layout.parse_meta(raw)
        data = (directory / "data").stat()
    except (OSError, ValueError, TypeError):
        return None
    if header.id != directory.name or object_id(header.url, header.version) != header.id:
        return None
    if data.st_size > header.size:
        return None  # grown past its size: never hand it out, and never trim it in place
    if data.st_size < header.size:  # cut short: only the blocks past the cut are lost
        blocks = {i: c for i, c in blocks.items() if header.block_span(i)[1] <= data.st_size}
    if not raw.endswith(b"\n"):  # end a torn record, or it swallows the next one
        with suppress(OSError), open(directory / "meta", "ab") as meta:
            meta.write(b"\n")
    try:
        used = (directory / "meta").stat().st_mtime
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
    target = layout.trash_dir(tier.root) / f"{directory.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(directory, target)
    except OSError:
        return
    crash_point("mid-eviction")
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
