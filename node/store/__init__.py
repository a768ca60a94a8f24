"""The block store: tiers of sparse object files, checksums, quotas, LRU and pins.

``Store`` composes one module per concern under one lock (an RLock, and a
condition on it that is notified when space may free up):

- ``objects``: the data model (``CachedObject``, ``Tier``);
- ``index``: tier roots, the index rebuilt from meta files at start, object
  directories made, adopted and retired;
- ``pins``: holders and their objects, persisted, with a reverse index;
- ``space``: reservations, quotas, pinned bytes and LRU eviction;
- ``blocks``: block reads, writes, verification and repair;
- ``digests``: an origin's digest of a whole object computed from its blocks.

The Store itself places objects (which tier, pinned first or not) and keeps the
index and the space accounting in step as objects come and go.
"""

from __future__ import annotations

import errno
import threading
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
from cachefs.node.store.index import (
    create_directory,
    load_object,
    open_tier,
    rebuild,
    resolve_group,
    retire_directory,
)
from cachefs.node.store.objects import CachedObject, Tier
from cachefs.node.store.pins import Pins
from cachefs.node.store.space import Space
from cachefs.types import TierStatus
from cachefs.units import format_size

__all__ = ["CachedObject", "Store", "Tier"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Store:
    """All tiers of one node, fastest first."""

    def __init__(self, tiers: Sequence[TierConfig], group: str | None = None) -> None:
        if not tiers:
            raise ValueError("at least one tier is needed")
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)  # notified when space may free up
        # Called (under the store's lock: never block) with the id of each removed object.
        self.removed_listeners: list[Callable[[str], None]] = []
        gid = resolve_group(group) if group else None
        self.tiers = [open_tier(config, gid) for config in tiers]
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
        self._space.track(obj)

    def _drop(self, obj: CachedObject) -> None:
        tier = obj.tier
        if tier.objects.get(obj.id) is obj:
            del tier.objects[obj.id]
            tier.used -= obj.charged
            self._space.untrack(obj)
        obj.retired = True

    def forget(self, obj: CachedObject) -> None:
        """Drop ``obj`` from the index only: its file was replaced by another process."""
        with self._lock:
            self._drop(obj)

    def retire(self, obj: CachedObject) -> None:
        """Drop ``obj`` from the index and from disk (holders of its inode keep it)."""
        with self._lock:
            self._drop(obj)
            retire_directory(obj.tier, obj.directory)
            self._room.notify_all()
        for listener in list(self.removed_listeners):
            listener(obj.id)

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
            if self._pins.remove(holder, object_ids):
                self._room.notify_all()

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
        """
        with self._lock:
            obj = self.get(header.id)
            if obj is not None:
                if tier_name is not None and obj.tier.name != tier_name:
                    obj = self._move_request(obj, tier_name)
                if obj is not None:
                    if pin_holder:
                        self._pin_checked(obj.tier, header, pin_holder)
                    if header.digest is not None:
                        self._blocks.learn_digest(obj, header.digest)
                    return obj
            candidates = [self.tier(tier_name)] if tier_name else self.tiers
            for tier in candidates:
                if header.footprint() <= tier.quota - self._space.pinned_bytes(tier):
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
        if obj.complete or obj.users or self._pins.is_pinned(obj.id):
            return obj
        self.retire(obj)
        return None

    def _pin_checked(self, tier: Tier, header: ObjectHeader, holder: str) -> None:
        if not self._pins.is_pinned(header.id):
            pinned = self._space.pinned_bytes(tier)
            if pinned + header.footprint() > tier.quota:
                raise QuotaExceededError(
                    f"cannot pin {header.url} ({format_size(header.size)}) in tier "
                    f"{tier.name!r}: {format_size(pinned)} of its {format_size(tier.quota)} "
                    "quota is already pinned; unpin something (cachefs unpin) or raise the quota"
                )
        self._pins.add(holder, header.id)

    def _create(self, tier: Tier, header: ObjectHeader) -> CachedObject | None:
        """A new object in ``tier``: its page of metadata reserved, its directory made.

        If another process on the same cache directory created it first, adopt
        theirs: same id means same URL and version, so the same bytes.
        """
        placeholder = CachedObject(header=header, tier=tier)
        if not self._space.reserve(tier, layout.PAGE, protect=placeholder):
            return None
        try:
            inode = create_directory(tier, header)
        except OSError as exc:
            self._space.unreserve(tier, layout.PAGE)
            if exc.errno in _NO_SPACE:  # the disk is full below the quota: evict, retry
                evicted = self._space.evict_one(tier, placeholder)
                return self._create(tier, header) if evicted else None
            raise
        if inode is None:
            self._space.unreserve(tier, layout.PAGE)
            return self._adopt(tier, header)
        with self._lock:
            tier.reserved -= layout.PAGE
            placeholder.charged = layout.PAGE
            placeholder.inode = inode
            self._add(placeholder)
        return placeholder

    def _adopt(self, tier: Tier, header: ObjectHeader) -> CachedObject | None:
        """Index the object directory another process created."""
        obj = load_object(tier, layout.object_dir(tier.root, header.id))
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
                )
                for t in self.tiers
            ]
