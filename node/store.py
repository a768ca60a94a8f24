"""The block store: tiers of sparse object files, checksums, quotas, LRU and pins.

Space is reserved before a block is written and charged when it is recorded, so a
tier's usage (``used + reserved``) never passes its quota; ``high_water`` records
the most it ever reached. A block is recorded only after its bytes are written, and
served only if they match the recorded xxh3 checksum (checked once per process,
and for a whole object before its path is handed out). Files that may be held by a
reader outside the store (a handed-out path, a hard link) are never rewritten: a
repair copies the good blocks into a new file that takes the old one's place.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from cachefs.node import layout
from cachefs.node.block_writer import BlockWriter
from cachefs.node.config import TierConfig, default_quota
from cachefs.node.faults import crash_point
from cachefs.node.layout import ObjectHeader

from cachefs.errors import CacheDirError, QuotaExceededError
from cachefs.units import format_size
from cachefs.urls import object_id

ROOT_MODE = 0o700
GROUP_ROOT_MODE = 0o750
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
STALE_TMP_SECONDS = 3600
# How long a writer waits for busy objects to be released before serving uncached.
ROOM_WAIT_SECONDS = 10.0
log = logging.getLogger("cachefs.store")


class SharedLock:
    """Shared by block writers (they write disjoint ranges in parallel), exclusive for
    a repair or a metadata rewrite, which must not race with any write."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(eq=False)
class CachedObject:
    """One object in one tier, and what the store knows about its blocks."""

    header: ObjectHeader
    tier: Tier
    present: dict[int, int] = field(default_factory=dict)
    verified: set[int] = field(default_factory=set)
    charged: int = 0
    last_used: float = field(default_factory=time.time)
    users: int = 0
    waiting: int = 0  # users blocked waiting for room: they do not keep it from eviction
    handed_out: bool = False
    retired: bool = False
    inode: int = 0
    lock: SharedLock = field(default_factory=SharedLock)
    append_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.header.id

    @property
    def directory(self) -> Path:
        return layout.object_dir(self.tier.root, self.id)

    @property
    def data_path(self) -> Path:
        return self.directory / "data"

    @property
    def meta_path(self) -> Path:
        return self.directory / "meta"

    @property
    def complete(self) -> bool:
        return len(self.present) == self.header.block_count

    @property
    def cached_bytes(self) -> int:
        return sum(
            self.header.block_span(i)[1] - self.header.block_span(i)[0] for i in self.present
        )


@dataclass(eq=False)
class Tier:
    """A directory with a byte quota; objects live wholly in one tier."""

    config: TierConfig
    quota: int
    objects: dict[str, CachedObject] = field(default_factory=dict)
    used: int = 0
    reserved: int = 0
    high_water: int = 0
    evictions: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def root(self) -> Path:
        return self.config.path

    def note_usage(self) -> None:
        self.high_water = max(self.high_water, self.used + self.reserved)


@dataclass(frozen=True)
class TierUsage:
    name: str
    medium: str
    path: str
    quota: int
    used: int
    reserved: int
    high_water: int
    pinned: int
    objects: int
    evictions: int


class Store:
    """All tiers of one node, fastest first."""

    def __init__(self, tiers: Sequence[TierConfig], group: str | None = None) -> None:
        if not tiers:
            raise ValueError("at least one tier is needed")
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)  # notified when space may free up
        # Called (under the store's lock: never block) with the id of each removed object.
        self.removed_listeners: list[Callable[[str], None]] = []
        self._gid = _resolve_group(group) if group else None
        self.tiers = [self._open_tier(config) for config in tiers]
        self._pins: dict[str, set[str]] = {}
        self._load_pins()
        for tier in self.tiers:
            self._enforce_quota(tier)
            tier.note_usage()  # after eviction: a smaller quota than last run holds too

    # -- setup -------------------------------------------------------------------

    def _open_tier(self, config: TierConfig) -> Tier:
        root = config.path
        _warn_if_not_memory(config)
        try:
            layout.make_parents(root)
            root.mkdir(exist_ok=True)
            if self._gid is not None:
                os.chown(root, -1, self._gid)
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
        tier = Tier(config=config, quota=quota)
        shutil.rmtree(layout.trash_dir(root), ignore_errors=True)
        layout.trash_dir(root).mkdir(mode=layout.DIR_MODE, exist_ok=True)
        self._rebuild_index(tier)
        return tier

    def _rebuild_index(self, tier: Tier) -> None:
        """Load every object's metadata from disk; retire what cannot be trusted."""
        for shard in layout.objects_dir(tier.root).iterdir():
            if not shard.is_dir():
                continue
            for directory in shard.iterdir():
                if directory.name.startswith(".new-") and not _stale(directory):
                    continue  # another process is creating it right now
                obj = self._load_object(tier, directory)
                if obj is None:
                    self._retire_directory(tier, directory)
                    continue
                tier.objects[obj.id] = obj
                tier.used += obj.charged

    def _load_object(self, tier: Tier, directory: Path) -> CachedObject | None:
        for leftover in directory.glob("*.tmp"):
            if _stale(leftover):
                with suppress(OSError):
                    leftover.unlink()
        try:
            raw = (directory / "meta").read_bytes()
            header, blocks = layout.parse_meta(raw)
            data_size = (directory / "data").stat().st_size
        except (OSError, ValueError, TypeError):
            return None
        if header.id != directory.name or object_id(header.url, header.version) != header.id:
            return None
        if data_size > header.size:
            return None  # grown past its size: never hand it out, and never trim it in place
        if data_size < header.size:  # cut short: only the blocks past the cut are lost
            blocks = {i: c for i, c in blocks.items() if header.block_span(i)[1] <= data_size}
        if not raw.endswith(b"\n"):  # end a torn record, or it swallows the next one
            with suppress(OSError), open(directory / "meta", "ab") as meta:
                meta.write(b"\n")
        obj = CachedObject(header=header, tier=tier, present=blocks)
        obj.inode = (directory / "data").stat().st_ino
        obj.charged = layout.PAGE + sum(_block_charge(header, i) for i in blocks)
        obj.last_used = (directory / "meta").stat().st_mtime
        return obj

    def _retire_directory(self, tier: Tier, directory: Path) -> None:
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

    # -- lookup ------------------------------------------------------------------

    def get(self, object_id: str) -> CachedObject | None:
        with self._lock:
            for tier in self.tiers:
                obj = tier.objects.get(object_id)
                if obj is not None:
                    return obj
        return None

    def objects(self) -> list[CachedObject]:
        with self._lock:
            return [obj for tier in self.tiers for obj in tier.objects.values()]

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise ValueError(
            f"no tier named {name!r}; configured tiers: {', '.join(t.name for t in self.tiers)}"
        )

    # -- pins --------------------------------------------------------------------

    @property
    def _pins_dir(self) -> Path:
        return layout.pins_dir(self.tiers[-1].root)

    def _load_pins(self) -> None:
        for path in self._pins_dir.glob("*.json"):
            try:
                record = json.loads(path.read_text())
                self._pins[str(record["holder"])] = set(map(str, record["objects"]))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)

    def _save_pins(self, holder: str) -> None:
        path = self._pins_dir / f"{xxhash.xxh3_64_hexdigest(holder.encode())}.json"
        ids = self._pins.get(holder)
        if not ids:
            path.unlink(missing_ok=True)
            return
        layout.write_file_atomic(
            path, json.dumps({"holder": holder, "objects": sorted(ids)}).encode()
        )

    def holders(self, object_id: str) -> list[str]:
        with self._lock:
            return sorted(h for h, ids in self._pins.items() if object_id in ids)

    def pins(self) -> dict[str, list[str]]:
        with self._lock:
            return {holder: sorted(ids) for holder, ids in self._pins.items()}

    def is_pinned(self, object_id: str) -> bool:
        with self._lock:
            return any(object_id in ids for ids in self._pins.values())

    def unpin(self, holder: str, object_ids: Iterable[str] | None = None) -> None:
        with self._lock:
            if holder not in self._pins:
                return
            if object_ids is None:
                self._pins[holder] = set()
            else:
                self._pins[holder].difference_update(object_ids)
            if not self._pins[holder]:
                del self._pins[holder]
            self._save_pins(holder)
            self._room.notify_all()

    def pinned_bytes(self, tier: Tier) -> int:
        with self._lock:
            return sum(o.header.footprint() for o in tier.objects.values() if self.is_pinned(o.id))

    # -- placement ---------------------------------------------------------------

    def place(
        self, header: ObjectHeader, tier_name: str | None = None, pin_holder: str | None = None
    ) -> CachedObject | None:
        """The object's entry, created in a tier with room if it has none.

        Room means the object fits in the quota beside the pinned objects (unpinned
        ones can be evicted). With ``pin_holder`` the object is pinned before any
        byte is fetched, and a tier without room raises QuotaExceededError; without
        it, no room means None: the caller serves the bytes without caching them.
        """
        with self._lock:
            obj = self.get(header.id)
            if obj is not None:
                if tier_name is not None and obj.tier.name != tier_name:
                    obj = self._move_request(obj, tier_name)
                if obj is not None:
                    if pin_holder:
                        self._pin_checked(obj.tier, header, pin_holder)
                    return obj
            candidates = [self.tier(tier_name)] if tier_name else self.tiers
            for tier in candidates:
                if header.footprint() <= tier.quota - self.pinned_bytes(tier):
                    if pin_holder:
                        self._pin_checked(tier, header, pin_holder)
                    return self._create(tier, header)
            if pin_holder:
                tier = candidates[0] if tier_name else self.tiers[-1]
                self._pin_checked(tier, header, pin_holder)  # raises with the figures
            return None

    def _move_request(self, obj: CachedObject, tier_name: str) -> CachedObject | None:
        """An object asked for in another tier: keep it where it is if complete."""
        self.tier(tier_name)  # validates the name
        if obj.complete or obj.users or self.is_pinned(obj.id):
            return obj
        self._remove(obj)
        return None

    def _pin_checked(self, tier: Tier, header: ObjectHeader, holder: str) -> None:
        if not self.is_pinned(header.id):
            pinned = self.pinned_bytes(tier)
            if pinned + header.footprint() > tier.quota:
                raise QuotaExceededError(
                    f"cannot pin {header.url} ({format_size(header.size)}) in tier "
                    f"{tier.name!r}: {format_size(pinned)} of its {format_size(tier.quota)} "
                    "quota is already pinned; unpin something (cachefs unpin) or raise the quota"
                )
        self._pins.setdefault(holder, set()).add(header.id)
        self._save_pins(holder)

    def _create(self, tier: Tier, header: ObjectHeader) -> CachedObject | None:
        """A new object directory, built under a temporary name and renamed into place.

        If another process on the same cache directory created it first, adopt
        theirs: same id means same URL and version, so the same bytes.
        """
        placeholder = CachedObject(header=header, tier=tier)
        if not self.reserve(tier, layout.PAGE, protect=placeholder):
            return None
        final = placeholder.directory
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
                return self._adopt(tier, final)
        except OSError as exc:
            self.unreserve(tier, layout.PAGE)
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno in _NO_SPACE:  # the disk is full below the quota: evict, retry
                with self._lock:
                    evicted = self._evict_one(tier, placeholder)
                return self._create(tier, header) if evicted else None
            raise
        with self._lock:
            tier.reserved -= layout.PAGE
            tier.used += layout.PAGE
            placeholder.charged = layout.PAGE
            placeholder.inode = (final / "data").stat().st_ino
            tier.objects[header.id] = placeholder
        return placeholder

    def _adopt(self, tier: Tier, directory: Path) -> CachedObject | None:
        """Index an object directory another process created."""
        self.unreserve(tier, layout.PAGE)
        obj = self._load_object(tier, directory)
        if obj is None:
            return None
        with self._lock:
            tier.objects[obj.id] = obj
            tier.used += obj.charged
            self._enforce_quota(tier)
        return None if obj.retired else obj

    def forget(self, obj: CachedObject) -> None:
        """Drop ``obj`` from the index only: its file was replaced by another process."""
        with self._lock:
            if obj.tier.objects.get(obj.id) is obj:
                del obj.tier.objects[obj.id]
                obj.tier.used -= obj.charged
            obj.retired = True

    # -- space -------------------------------------------------------------------

    def reserve(self, tier: Tier, amount: int, protect: CachedObject) -> bool:
        """Reserve ``amount`` bytes in ``tier``, evicting LRU unpinned objects if needed.

        When every evictable object is busy (being read or filled), wait for one to
        be released, up to ROOM_WAIT_SECONDS; a writer that waits does not keep its
        own object from eviction, so writers waiting on each other cannot deadlock.
        """
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        with self._room:
            while tier.used + tier.reserved + amount > tier.quota:
                if self._evict_one(tier, protect):
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._busy(tier, protect):
                    return False
                protect.waiting += 1
                try:
                    self._room.wait(remaining)
                finally:
                    protect.waiting -= 1
                if protect.retired:
                    return False
            tier.reserved += amount
            tier.note_usage()
            return True

    def _busy(self, tier: Tier, protect: CachedObject) -> bool:
        """Whether an unpinned object of ``tier`` is in active use (it will be released)."""
        return any(
            o is not protect and o.users > o.waiting and not self.is_pinned(o.id)
            for o in tier.objects.values()
        )

    def _evict_one(self, tier: Tier, protect: CachedObject | None) -> bool:
        candidates = [
            o
            for o in tier.objects.values()
            if o is not protect and o.users == o.waiting and not self.is_pinned(o.id)
        ]
        if not candidates:
            return False
        victim = min(candidates, key=lambda o: o.last_used)
        log.info("evicting %s from tier %s to make room", victim.header.url, tier.name)
        self._remove(victim)
        tier.evictions += 1
        return True

    def _remove(self, obj: CachedObject) -> None:
        """Drop ``obj`` from the index and from disk (holders of its inode keep it)."""
        with self._lock:
            tier = obj.tier
            if tier.objects.get(obj.id) is obj:
                del tier.objects[obj.id]
                tier.used -= obj.charged
            obj.retired = True
            self._retire_directory(tier, obj.directory)
            self._room.notify_all()
        for listener in list(self.removed_listeners):
            listener(obj.id)

    def _enforce_quota(self, tier: Tier) -> None:
        """After a restart with a smaller quota: evict until usage fits."""
        with self._lock:
            while tier.used > tier.quota and self._evict_one(tier, None):
                pass

    def evict(self, obj: CachedObject) -> None:
        """Evict ``obj`` now. Raises PermissionError-like errors for pinned or busy ones."""
        with self._lock:
            holders = self.holders(obj.id)
            if holders:
                raise QuotaExceededError(
                    f"{obj.header.url} is pinned by {', '.join(holders)}; unpin it first"
                )
            if obj.users:
                raise BlockingIOError(
                    errno.EBUSY, f"{obj.header.url} is being read or filled; try again later"
                )
            self._remove(obj)
            obj.tier.evictions += 1

    # -- blocks ------------------------------------------------------------------

    @contextmanager
    def in_use(self, obj: CachedObject) -> Iterator[CachedObject]:
        """Keep ``obj`` from eviction while a reader or filler works on it."""
        with self._lock:
            obj.users += 1
        try:
            yield obj
        finally:
            with self._room:
                obj.users -= 1
                self._room.notify_all()

    def block_writer(self, obj: CachedObject, index: int) -> BlockWriter | None:
        """A sink that streams block ``index`` into ``obj``'s file; None if no room.

        Order: reserve space, write bytes, then append the checksum record. A crash
        between the two leaves bytes that no record vouches for: they are refetched.
        """
        charge = _block_charge(obj.header, index)
        if obj.retired or not self.reserve(obj.tier, charge, protect=obj):
            return None
        try:
            return BlockWriter(self, obj, index, charge)
        except FileNotFoundError:  # evicted by another process on this cache directory
            self.unreserve(obj.tier, charge)
            self.forget(obj)
            return None

    def write_block(self, obj: CachedObject, index: int, data: memoryview) -> bool:
        """Write and record one block held in memory. False: not cached (no room)."""
        writer = self.block_writer(obj, index)
        if writer is None:
            return False
        try:
            writer.begin()
            writer.write(data)
        except BaseException:
            writer.close()
            raise
        return writer.commit() is None

    def make_room(self, tier: Tier, amount: int, protect: CachedObject) -> bool:
        """After ENOSPC: evict until ``amount`` bytes are freed; False if it cannot."""
        with self._lock:
            goal = tier.used - amount
            while tier.used > goal:
                if not self._evict_one(tier, protect=protect):
                    return False
            return True

    def note_recorded(self, obj: CachedObject, index: int, checksum: int, charge: int) -> None:
        """A block's record is on disk: its reserved space becomes used."""
        with self._lock:
            obj.tier.reserved -= charge
            obj.tier.used += charge
            obj.charged += charge
            obj.present[index] = checksum
            obj.verified.add(index)

    def unreserve(self, tier: Tier, amount: int) -> None:
        with self._room:
            tier.reserved -= amount
            self._room.notify_all()

    def read(self, obj: CachedObject, index: int, offset: int, into: memoryview) -> bool:
        """Copy bytes of block ``index`` from ``offset`` within it into ``into``.

        False if the block is absent, or present but corrupt (then it is discarded
        so the caller refetches it).
        """
        checksum = obj.present.get(index)
        if checksum is None or obj.retired:
            return False
        start, end = obj.header.block_span(index)
        if index in obj.verified:
            ok = _pread_exact(obj.data_path, into, start + offset, obj.inode)
        else:
            block = bytearray(end - start)
            ok = _pread_exact(obj.data_path, memoryview(block), start, obj.inode)
            if ok and xxhash.xxh3_64_intdigest(block) == checksum:
                obj.verified.add(index)
                into[:] = memoryview(block)[offset : offset + len(into)]
            elif ok:
                ok = False
        if ok is None:
            self.forget(obj)
            return False
        if not ok:
            self.discard(obj, [index])
            return False
        obj.last_used = time.time()
        return True

    def pread(self, obj: CachedObject, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of verified blocks in one read; None if the file changed."""
        try:
            fd = os.open(obj.data_path, os.O_RDONLY)
        except OSError:
            self.forget(obj)
            return None
        try:
            if os.fstat(fd).st_ino != obj.inode:
                self.forget(obj)
                return None
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        if len(data) != end - start:
            return None
        obj.last_used = time.time()
        return data

    def verify(self, obj: CachedObject) -> list[int]:
        """Check every present block against its checksum; discard and return the bad."""
        bad = []
        buffer = bytearray(obj.header.block_size)
        for index, checksum in sorted(obj.present.items()):
            start, end = obj.header.block_span(index)
            view = memoryview(buffer)[: end - start]
            ok = _pread_exact(obj.data_path, view, start, obj.inode)
            if ok is None:
                self.forget(obj)
                return sorted(obj.present)
            if ok and xxhash.xxh3_64_intdigest(view) == checksum:
                obj.verified.add(index)
            else:
                bad.append(index)
        if bad:
            self.discard(obj, bad)
        return bad

    def discard(self, obj: CachedObject, indices: Sequence[int]) -> None:
        """Forget corrupt blocks. A file someone may hold is repaired into a new file."""
        with self._lock:
            if obj.retired:
                return
            # A complete file may be mapped by a reader in any process (open_local),
            # a linked one is in a view: repair those into a new file, never in place.
            held = obj.handed_out or obj.complete or _link_count(obj.data_path) > 1
        log.warning(
            "%s: blocks %s failed verification; fetching them again",
            obj.header.url,
            list(indices),
        )
        if held:
            if not self._repair_into_new_file(obj, set(indices)):
                self._remove(obj)
            return
        with obj.lock.exclusive():
            with self._lock:
                for index in indices:
                    if index in obj.present:
                        del obj.present[index]
                        obj.verified.discard(index)
                        charge = _block_charge(obj.header, index)
                        obj.charged -= charge
                        obj.tier.used -= charge
                payload = layout.encode_header(obj.header) + b"".join(
                    layout.encode_block(i, c) for i, c in sorted(obj.present.items())
                )
            crash_point("mid-repair")
            layout.write_file_atomic(obj.meta_path, payload)

    def _repair_into_new_file(self, obj: CachedObject, bad: set[int]) -> bool:
        """Copy the good blocks into a new data file and swap it in; False if no room.

        The old file keeps its inode and bytes for whoever holds it; the new one
        lacks the bad blocks, which readers then fetch again.
        """
        keep = {i: c for i, c in obj.present.items() if i not in bad}
        charge = layout.PAGE + sum(_block_charge(obj.header, i) for i in keep)
        if not self.reserve(obj.tier, charge, protect=obj):
            return False
        final = obj.directory
        staging = final.parent / f".new-{obj.id}-{uuid.uuid4().hex[:8]}"
        retired = layout.trash_dir(obj.tier.root) / f"{obj.id}-{uuid.uuid4().hex[:8]}"
        with obj.lock.exclusive():
            try:
                staging.mkdir(mode=layout.DIR_MODE)
                os.chmod(staging, layout.DIR_MODE)
                _copy_blocks(obj, staging / "data", keep)
                layout.write_file_atomic(
                    staging / "meta",
                    layout.encode_header(obj.header)
                    + b"".join(layout.encode_block(i, c) for i, c in sorted(keep.items())),
                )
                crash_point("mid-repair")
                os.rename(final, retired)
                os.rename(staging, final)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                self.unreserve(obj.tier, charge)
                return False
            inode = (final / "data").stat().st_ino
        with self._lock:
            obj.tier.reserved -= charge
            obj.tier.used += charge - obj.charged
            obj.charged = charge
            obj.present = keep
            obj.verified -= bad
            obj.inode = inode
            obj.handed_out = False
        shutil.rmtree(retired, ignore_errors=True)
        return True

    def local_path(self, obj: CachedObject) -> Path | None:
        """The data file of a complete, fully verified object, or None."""
        if not obj.complete or obj.retired:
            return None
        if len(obj.verified) != obj.header.block_count and self.verify(obj):
            return None
        obj.handed_out = True
        obj.last_used = time.time()
        return obj.data_path

    # -- reporting ---------------------------------------------------------------

    def usage(self) -> list[TierUsage]:
        with self._lock:
            return [
                TierUsage(
                    name=t.name,
                    medium=t.config.medium,
                    path=str(t.root),
                    quota=t.quota,
                    used=t.used,
                    reserved=t.reserved,
                    high_water=t.high_water,
                    pinned=self.pinned_bytes(t),
                    objects=len(t.objects),
                    evictions=t.evictions,
                )
                for t in self.tiers
            ]


def _block_charge(header: ObjectHeader, index: int) -> int:
    start, end = header.block_span(index)
    return layout.round_up(end - start)


def _pread_exact(path: Path, into: memoryview, offset: int, inode: int) -> bool | None:
    """Fill ``into`` from ``path`` at ``offset``.

    True when filled; False on a short read or an I/O error (corruption); None when
    the file is missing or is another file than ours (another process replaced it).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_ino != inode:
            return None
        done = 0
        while done < len(into):
            got = os.preadv(fd, [into[done:]], offset + done)
            if got == 0:
                return False
            done += got
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _copy_blocks(obj: CachedObject, target: Path, blocks: dict[int, int]) -> None:
    """A new sparse data file holding ``blocks`` copied from ``obj``'s (in the kernel)."""
    source = os.open(obj.data_path, os.O_RDONLY)
    try:
        if os.fstat(source).st_ino != obj.inode:
            raise FileNotFoundError(errno.ENOENT, "data file replaced", str(obj.data_path))
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, layout.FILE_MODE)
        try:
            os.fchmod(fd, layout.FILE_MODE)
            os.ftruncate(fd, obj.header.size)
            for index in sorted(blocks):
                start, end = obj.header.block_span(index)
                offset = start
                while offset < end:
                    copied = os.copy_file_range(source, fd, end - offset, offset, offset)
                    if copied == 0:
                        raise OSError(errno.EIO, "short copy", str(obj.data_path))
                    offset += copied
        finally:
            os.close(fd)
    finally:
        os.close(source)


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


def _stale(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > STALE_TMP_SECONDS
    except OSError:
        return False


def _link_count(path: Path) -> int:
    try:
        return path.stat().st_nlink
    except OSError:
        return 1


def _resolve_group(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ValueError(f"group {group!r} does not exist on this host") from exc
