"""The block store: tiers of sparse object files, checksums, quotas, LRU and pins.

``Store`` composes one module per concern under one lock (a reentrant lock that
defers disk work to its release, and a condition on it that is notified when space
may free up):

- ``objects``: the data model (``CachedObject``, ``Tier``);
- ``index``: tier roots, the index rebuilt from meta files at start, object
  directories made, adopted and retired;
- ``pins``: holders and their objects, persisted, with a reverse index;
- ``space``: reservations, quotas, pinned bytes and LRU eviction;
- ``blocks``: block reads, writes, verification and repair;
- ``digests``: an origin's digest of a whole object computed from its blocks;
- ``health``: each tier's disk errors and hangs, and whether it is degraded;
- ``lock``: the store's lock, which no disk I/O happens under.

The Store itself places objects (which tier, pinned first or not) and keeps the
index and the space accounting in step as objects come and go. Its lock guards
bookkeeping only: directories are made, moved to the trash and removed, and pin
files written, after it is let go, so a disk that hangs holds up only the threads
that touch it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

from cachefs.errors import QuotaExceededError
from cachefs.node import layout
from cachefs.node.config import TierConfig
from cachefs.node.layout import Digest, ObjectHeader
from cachefs.node.store.block_writer import BlockWriter
from cachefs.node.store.blocks import Blocks
from cachefs.node.store.health import HealthStatus, is_fault
from cachefs.node.store.index import (
    create_directory,
    load_object,
    open_tier,
    rebuild,
    remove_trashed,
    resolve_group,
    trash_directory,
)
from cachefs.node.store.lock import StoreLock
from cachefs.node.store.objects import CachedObject, Tier
from cachefs.node.store.ownership import EMBEDDED, Owner
from cachefs.node.store.pins import Pins, write_record
from cachefs.node.store.space import Space
from cachefs.types import TierStatus
from cachefs.units import format_size

__all__ = ["CachedObject", "Store", "Tier"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_CURRENT_VERSIONS = 16384  # URLs whose current version is remembered
log = logging.getLogger("cachefs.store")


class Store:
    """All tiers of one node, fastest first."""

    def __init__(
        self, tiers: Sequence[TierConfig], group: str | None = None, owner: Owner = EMBEDDED
    ) -> None:
        """``owner``: a node (which may not share its directories) or embedded mode."""
        if not tiers:
            raise ValueError("at least one tier is needed")
        self._lock = StoreLock()
        # Notified when space may free up (and when a directory is made or gone).
        self._room = threading.Condition(self._lock)  # type: ignore[arg-type]
        self._creating: dict[str, Tier] = {}  # ids whose directory a thread is making
        self._pin_writes = threading.Lock()  # one pin file write at a time
        # Called (under the store's lock: never block) with the id of each removed object.
        self.removed_listeners: list[Callable[[str], None]] = []
        self._versions: dict[str, set[CachedObject]] = {}  # canonical URL -> its objects
        # Canonical URL -> the id of the version its origin reported last (bounded).
        self._current: OrderedDict[str, str] = OrderedDict()
        gid = resolve_group(group) if group else None
        self.tiers: list[Tier] = []
        try:
            for config in tiers:
                self.tiers.append(open_tier(config, gid, owner))
        except BaseException:
            self.release_directories()
            raise
        self._pins = Pins(layout.pins_dir(self.tiers[-1].root), changed=self._pin_changed)
        self._space = Space(self.tiers, self._room, self._pins, retire=self.retire)
        self._blocks = Blocks(
            self._space,
            self._lock,
            writer=partial(BlockWriter, self),
            forget=self.forget,
            retire=self.retire,
        )
        with self._lock:
            for tier in self.tiers:
                for obj in rebuild(tier):
                    self._add(obj)
                self._space.enforce_quota(tier)
                tier.note_usage()  # after eviction: a smaller quota than last run holds too

    def release_directories(self) -> None:
        """Let go of the tier roots (see ``ownership``): a draining node calls this, so
        the node that replaces it can start."""
        for tier in self.tiers:
            if tier.claim is not None:
                tier.claim.release()

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

    # -- the index ---------------------------------------------------------------

    def _add(self, obj: CachedObject) -> None:
        obj.tier.objects[obj.id] = obj
        obj.tier.used += obj.charged
        versions = self._versions.setdefault(obj.header.url, set())
        current = self._current.get(obj.header.url)
        if current is None:
            # No stat yet (a restart, a new process): the version cached last is taken
            # for the current one (the index loads oldest first) until a stat says.
            for other in versions:
                self._space.supersede(other)
            obj.superseded = False
        else:
            obj.superseded = current != obj.id
        versions.add(obj)
        self._space.track(obj)

    def _drop(self, obj: CachedObject) -> None:
        tier = obj.tier
        if tier.objects.get(obj.id) is obj:
            del tier.objects[obj.id]
            tier.used -= obj.charged
            self._space.untrack(obj)
            versions = self._versions.get(obj.header.url)
            if versions is not None:
                versions.discard(obj)
                if not versions:
                    del self._versions[obj.header.url]
        obj.retired = True

    def note_current(self, url: str, object_id: str) -> None:
        """The origin's version of ``url`` is ``object_id`` now: the other versions
        cached are superseded, evicted before anything else."""
        with self._lock:
            self._current[url] = object_id
            self._current.move_to_end(url)
            while len(self._current) > _CURRENT_VERSIONS:
                self._current.popitem(last=False)
            for obj in self._versions.get(url, ()):
                if obj.id != object_id:
                    self._space.supersede(obj)
                else:
                    obj.superseded = False

    def forget(self, obj: CachedObject) -> None:
        """Drop ``obj`` from the index only: its file was replaced by another process."""
        with self._lock:
            self._drop(obj)

    def retire(self, obj: CachedObject) -> None:
        """Drop ``obj`` from the index and from disk (holders of its inode keep it).

        The disk work waits until this thread holds the store's lock no more; until
        its directory has left, the object is not made again in its tier.
        """
        with self._lock:
            self._drop(obj)
            obj.tier.retiring[obj.id] += 1
            self._lock.defer(partial(self._remove_directory, obj.tier, obj.id, obj.directory))
            self._room.notify_all()
        for listener in list(self.removed_listeners):
            listener(obj.id)

    def _remove_directory(self, tier: Tier, object_id: str, directory: Path) -> None:
        """A retired object's directory, into the trash and away (deferred disk work)."""
        trashed = None
        try:
            with tier.health.watch("metadata"):
                trashed = trash_directory(tier, directory)
        except OSError as exc:  # left in place: a restart indexes or retires it again
            if is_fault(exc):
                tier.health.fault("metadata", f"moving {directory} to the trash", exc)
        finally:
            with self._lock:
                tier.retiring[object_id] -= 1
                if tier.retiring[object_id] <= 0:
                    del tier.retiring[object_id]
                self._room.notify_all()
        with tier.health.watch("metadata"):
            remove_trashed(trashed)

    def evict(self, obj: CachedObject) -> None:
        """Evict ``obj`` now. Raises QuotaExceededError if pinned, BlockingIOError if busy."""
        self._space.evict(obj)

    # -- pins --------------------------------------------------------------------

    def _pin_changed(self, object_id: str) -> None:
        obj = self.get(object_id)
        if obj is not None:
            self._space.refresh(obj)

    def holders(self, object_id: str) -> list[str]:
        with self._lock:
            return self._pins.holders(object_id)

    def pins(self) -> dict[str, list[str]]:
        with self._lock:
            return self._pins.snapshot()

    def is_pinned(self, object_id: str) -> bool:
        with self._lock:
            return self._pins.is_pinned(object_id)

    def unpin(self, holder: str, object_ids: Iterable[str] | None = None) -> None:
        with self._lock:
            changed = self._pins.remove(holder, object_ids)
            if changed:
                self._room.notify_all()
        if changed:
            self._save_pins(holder)

    def _save_pins(self, holder: str) -> None:
        """Write ``holder``'s pin file once the store's lock is let go: pin files live
        on the last tier, and a disk that hangs there must hold up pin changes only.
        One write at a time, each of the state as it is then: the last is the latest."""
        tier = self.tiers[-1]
        with self._pin_writes:
            with self._lock:
                path, payload = self._pins.record(holder)
            try:
                with tier.health.watch("metadata"):
                    write_record(path, payload)
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    self._note_full(tier)
                    raise QuotaExceededError(
                        f"cannot record the pins of {holder}: {tier.full}"
                    ) from exc
                if is_fault(exc):
                    tier.health.fault("metadata", f"writing the pins of {holder}", exc)
                    raise OSError(
                        exc.errno,
                        f"cannot record the pins of {holder}: the disk of tier {tier.name!r} "
                        f"({tier.root}) failed ({exc.strerror}); check the disk",
                    ) from exc
                raise

    def pinned_bytes(self, tier: Tier) -> int:
        with self._lock:
            return self._space.pinned_bytes(tier)

    # -- placement ---------------------------------------------------------------

    def place(
        self, header: ObjectHeader, tier_name: str | None = None, pin_holder: str | None = None
    ) -> CachedObject | None:
        """The object's entry, created in a tier with room if it has none.

        Room means the object fits in the quota beside the pinned objects (unpinned
        ones can be evicted). With ``pin_holder`` the object is pinned before any
        byte is fetched, and a tier without room raises QuotaExceededError; without
        it, no room means None: the caller serves the bytes without caching them.
        An object made without its origin's digest learns it from ``header``.

        A degraded tier takes no new object (the next tier with room does), and an
        incomplete object nobody uses or pins leaves one. The object's directory is
        made, and the pin file written, after the store's lock is let go.
        """
        pinned = False
        try:
            with self._lock:
                obj = self._existing(header, tier_name)
                if obj is not None:
                    if pin_holder:
                        pinned = self._pin_checked(obj.tier, header, pin_holder)
                    if header.digest is not None:
                        self._blocks.learn_digest(obj, header.digest)
                    return obj
                candidates = [self.tier(tier_name)] if tier_name else self.tiers
                room = [
                    tier
                    for tier in candidates
                    if header.footprint() <= tier.quota - self._space.pinned_bytes(tier)
                ]
                if pin_holder:  # without room, this raises with the figures
                    fallback = candidates[0] if tier_name else self.tiers[-1]
                    pinned = self._pin_checked(room[0] if room else fallback, header, pin_holder)
                if not room:
                    return None
                self._creating[header.id] = room[0]
            try:
                for tier in room:
                    self._creating[header.id] = tier
                    obj = self._create(tier, header)
                    if obj is not None:
                        return obj
                return None
            finally:
                with self._lock:
                    self._creating.pop(header.id, None)
                    self._room.notify_all()
        finally:
            if pinned and pin_holder:
                try:
                    self._save_pins(pin_holder)
                except BaseException:  # not recorded, so not pinned
                    with self._lock:
                        self._pins.remove(pin_holder, [header.id])
                        self._room.notify_all()
                    raise

    def _existing(self, header: ObjectHeader, tier_name: str | None) -> CachedObject | None:
        """The object's entry; None when it is to be made (again). Under the lock.

        While another thread makes its directory, wait for it, unless that thread's
        disk hangs. An object asked for in another tier moves there, and one in a
        degraded tier leaves it, when nothing holds it where it is: it is complete,
        in use or pinned.
        """
        while True:
            making = self._creating.get(header.id)
            if making is None or making.health.stalled():
                break
            self._room.wait(1.0)  # a hang shows only when looked at
        obj = self.get(header.id)
        if obj is None:
            return None
        held = obj.complete or obj.users or self._pins.is_pinned(obj.id)
        if tier_name is not None and obj.tier.name != tier_name:
            self.tier(tier_name)  # validates the name
            moves = not held
        else:
            health = obj.tier.health
            moves = health.degraded and not held and not health.stalled()
        if not moves:
            return obj
        self.retire(obj)
        return None

    def _pin_checked(self, tier: Tier, header: ObjectHeader, holder: str) -> bool:
        """Pin the object for ``holder`` if ``tier`` has room for it beside the pinned
        ones; True if the holder did not pin it yet (its file is to be written)."""
        if not self._pins.is_pinned(header.id):
            pinned = self._space.pinned_bytes(tier)
            if pinned + header.footprint() > tier.quota:
                raise QuotaExceededError(
                    f"cannot pin {header.url} ({format_size(header.size)}) in tier "
                    f"{tier.name!r}: {format_size(pinned)} of its {format_size(tier.quota)} "
                    "quota is already pinned; unpin something (cachefs unpin) or raise the quota"
                )
        return self._pins.add(holder, header.id)

    def _create(self, tier: Tier, header: ObjectHeader) -> CachedObject | None:
        """A new object in ``tier``: its page of metadata reserved, its directory made
        (not under the store's lock). None when the tier cannot take it: degraded,
        full on disk with nothing to evict, or failing.

        If another process on the same cache directory created it first, adopt
        theirs: same id means same URL and version, so the same bytes.
        """
        with self._lock:
            if not self._ready_for(tier, header.id):
                return None
        placeholder = CachedObject(header=header, tier=tier)
        if not self._space.reserve(tier, layout.PAGE, protect=placeholder):
            return None
        try:
            with tier.health.watch("metadata"):
                inode = create_directory(tier, header)
        except OSError as exc:
            self._space.unreserve(tier, layout.PAGE)
            if exc.errno in _NO_SPACE:  # the disk is full below the quota: evict, retry
                self._note_full(tier)
                evicted = self._space.evict_one(tier, placeholder)
                return self._create(tier, header) if evicted else None
            if is_fault(exc):
                tier.health.fault("metadata", f"making the directory of {header.url}", exc)
                return None
            raise
        if inode is None:
            self._space.unreserve(tier, layout.PAGE)
            return self._adopt(tier, header)
        with self._lock:
            tier.reserved -= layout.PAGE
            tier.full = None
            current = tier.objects.get(header.id)
            if current is not None:  # another thread of ours adopted it meanwhile
                return current
            placeholder.charged = layout.PAGE
            placeholder.inode = inode
            self._add(placeholder)
        return placeholder

    def _ready_for(self, tier: Tier, object_id: str) -> bool:
        """Whether ``tier`` may take a new object now: not degraded, and no directory of
        the same id on its way out (waited for, while the tier's disk answers)."""
        if not tier.health.usable():
            return False
        while tier.retiring.get(object_id):
            if tier.health.stalled():
                return False
            self._room.wait(1.0)  # also runs this thread's deferred disk work
        return True

    def _note_full(self, tier: Tier) -> None:
        """Record (and log, once) why the disk of ``tier`` refused to take more: what
        is full, and what to do about it."""
        try:
            fs = os.statvfs(tier.root)
        except OSError:
            fs = None
        if fs is not None and fs.f_files and fs.f_favail == 0:
            reason = (
                f"the filesystem of tier {tier.name!r} ({tier.root}) has no free inodes "
                f"(all {fs.f_files} are used, while {format_size(fs.f_bavail * fs.f_frsize)} "
                "of space is free), and each cached object needs a directory and two files: "
                "give the filesystem more inodes (tmpfs: the nr_inodes option), remove other "
                "files from it, or unpin cached objects so that they can be evicted"
            )
        else:
            free = format_size(fs.f_bavail * fs.f_frsize) if fs is not None else "no space"
            reason = (
                f"the disk of tier {tier.name!r} ({tier.root}) is full ({free} free) below "
                f"the tier's quota of {format_size(tier.quota)}: lower the quota to what the "
                "disk holds, free space on it, or unpin cached objects so that they can be "
                "evicted"
            )
        if reason != tier.full:
            log.warning("%s", reason)
        tier.full = reason

    def _adopt(self, tier: Tier, header: ObjectHeader) -> CachedObject | None:
        """Index the object directory another process created."""
        try:
            with tier.health.watch("metadata"):
                obj = load_object(tier, layout.object_dir(tier.root, header.id))
        except OSError as exc:
            if is_fault(exc):
                tier.health.fault("metadata", f"loading the directory of {header.url}", exc)
            return None
        if obj is None:
            return None
        with self._lock:
            current = tier.objects.get(obj.id)
            if current is not None:  # indexed meanwhile by another thread of ours
                return current
            self._add(obj)
            self._space.enforce_quota(tier)
        return None if obj.retired else obj

    # -- space -------------------------------------------------------------------

    def in_use(self, obj: CachedObject) -> AbstractContextManager[CachedObject]:
        """Keep ``obj`` from eviction while a reader or filler works on it."""
        return self._space.in_use(obj)

    def reserve(self, tier: Tier, amount: int, protect: CachedObject) -> bool:
        """Reserve ``amount`` bytes in ``tier``, evicting if needed; False if no room."""
        return self._space.reserve(tier, amount, protect)

    def unreserve(self, tier: Tier, amount: int) -> None:
        self._space.unreserve(tier, amount)

    def make_room(self, tier: Tier, amount: int, protect: CachedObject) -> bool:
        """After ENOSPC: evict until ``amount`` bytes are freed; False if it cannot."""
        return self._space.make_room(tier, amount, protect)

    # -- blocks ------------------------------------------------------------------

    def block_writer(self, obj: CachedObject, index: int) -> BlockWriter | None:
        """A sink that streams block ``index`` into ``obj``'s file; None if no room."""
        return self._blocks.block_writer(obj, index)

    def write_block(self, obj: CachedObject, index: int, data: memoryview) -> bool:
        """Write and record one block held in memory. False: not cached (no room)."""
        return self._blocks.write_block(obj, index, data)

    def note_recorded(
        self, obj: CachedObject, index: int, checksum: int, charge: int, crc: int | None
    ) -> None:
        """A block's record is on disk: its reserved space becomes used."""
        self._blocks.note_recorded(obj, index, checksum, charge, crc)

    def read(self, obj: CachedObject, index: int, offset: int, into: memoryview) -> bool:
        """Bytes of block ``index`` from ``offset`` into ``into``; False if absent or bad."""
        return self._blocks.read(obj, index, offset, into)

    def open_block(
        self, obj: CachedObject, index: int
    ) -> AbstractContextManager[tuple[int, int] | None]:
        """(open data file, checksum) of a verified block ``index``, to send; or None."""
        return self._blocks.open_block(obj, index)

    def pread(self, obj: CachedObject, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of verified blocks in one read; None if the file changed."""
        return self._blocks.pread(obj, start, end)

    def verify(self, obj: CachedObject) -> list[int]:
        """Check every present block against its checksum; discard and return the bad."""
        return self._blocks.verify(obj)

    def check_block(
        self, obj: CachedObject, index: int, buffer: memoryview, paced: Callable[[int], None]
    ) -> bool | None:
        """Re-read one block, verified or not (the scrubber); a bad one is discarded.

        True: intact; False: corrupt or unreadable; None: it went away meanwhile.
        """
        return self._blocks.check(obj, index, buffer, paced)

    def discard(self, obj: CachedObject, indices: Sequence[int]) -> None:
        """Forget corrupt blocks. A file someone may hold is repaired into a new file."""
        self._blocks.discard(obj, indices)

    def local_path(self, obj: CachedObject) -> Path | None:
        """The data file of a complete, fully verified object, or None. Verified means
        every block against its xxh3 and the whole against its origin's digest (see
        ``verify_digest``: a second mismatch raises IntegrityError)."""
        return self._blocks.local_path(obj)

    # -- the origin's digest -----------------------------------------------------

    def learn_digest(self, obj: CachedObject, digest: Digest) -> None:
        """Give an object made without its origin's digest that digest."""
        self._blocks.learn_digest(obj, digest)

    def verify_digest(self, obj: CachedObject) -> bool:
        """Check a complete object against its origin's digest (once; recorded).

        False: a block failed its checksum, or the whole failed the digest and every
        block was dropped; fetch them again (from the origin only: ``origin_only``).
        Raises IntegrityError when it fails again after that.
        """
        return self._blocks.verify_digest(obj)

    def origin_only(self, object_id: str) -> bool:
        """Whether the object's blocks must come from the origin, never from peers."""
        return self._blocks.origin_only(object_id)

    # -- reporting ---------------------------------------------------------------

    def stalled(self, obj: CachedObject) -> bool:
        """Whether the disk of ``obj``'s tier hangs (an operation waits past the
        deadline): its blocks are then fetched elsewhere instead of read."""
        return obj.tier.health.stalled()

    def health(self) -> list[HealthStatus]:
        """Each tier's disk health: errors, stalls, and whether it is degraded."""
        return [tier.health.status() for tier in self.tiers]

    def trouble(self) -> str:
        """Why tiers take no new data now, with what to do about it ("" if none)."""
        reasons = []
        for tier in self.tiers:
            if tier.health.degraded:
                reasons.append(
                    f"tier {tier.name!r} ({tier.root}) is degraded: {tier.health.reason}; "
                    "check its disk"
                )
            elif tier.full:
                reasons.append(tier.full)
        return "; ".join(reasons)

    def usage(self) -> list[TierStatus]:
        with self._lock:
            return [
                TierStatus(
                    name=t.name,
                    medium=t.config.medium,
                    path=str(t.root),
                    quota=t.quota,
                    used=t.used,
                    reserved=t.reserved,
                    high_water=t.high_water,
                    pinned=self._space.pinned_bytes(t),
                    objects=len(t.objects),
                    evictions=t.evictions,
                    state="degraded" if t.health.degraded else "ok",
                    reason=t.health.reason if t.health.degraded else "",
                )
                for t in self.tiers
            ]
