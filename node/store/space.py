"""Space: reservations against quotas, the high-water mark, and LRU eviction.

Space is reserved before a block is written and charged when it is recorded, so a
tier's usage (``used + reserved``) never passes its quota; ``high_water`` records
the most it ever reached. To make room, the least recently used object that is
neither pinned nor in use is evicted.

Each indexed object is in exactly one place of its tier, moved whenever its pins or
users change, so that no decision scans the tier's objects (evicting N objects costs
O(N)): pinned (never evicted; their footprints summed as the tier's pinned bytes),
in use (being read or filled, so eviction skips it and a writer short of room waits
for it), or evictable, in LRU order. An object joins the LRU order as the most
recently used when it is indexed, used (read, a block recorded, its path handed
out), released by its last user or unpinned by its last holder; after a restart the
index is loaded oldest meta file first, so the order is the files' mtimes. A
superseded object (an older version of a URL whose origin now has another) goes to
the front instead, and use does not move it back: old versions are reclaimed first.

Reads mark an object used without the store's lock (the fast read path never takes
it): the marks wait in a queue that is applied, in order, before anything else joins
the LRU order, before each eviction, and whenever it grows long.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from cachefs.errors import QuotaExceededError
from cachefs.node.store.objects import CachedObject, Tier
from cachefs.node.store.pins import Pins

# How long a writer waits for busy objects to be released before serving uncached.
ROOM_WAIT_SECONDS = 10.0
# Marks of use queued before the next one that finds the lock free applies them.
_QUEUED_MARKS = 1024
log = logging.getLogger("cachefs.store")


class _TierSpace:
    """One tier's objects by what eviction may do with them."""

    def __init__(self) -> None:
        self.pinned: set[CachedObject] = set()
        self.pinned_bytes = 0
        self.in_use: set[CachedObject] = set()  # unpinned ones only
        self.lru: OrderedDict[CachedObject, None] = OrderedDict()  # least recent first

    def holds(self, obj: CachedObject) -> bool:
        return obj in self.lru or obj in self.in_use or obj in self.pinned

    def take(self, obj: CachedObject) -> None:
        if obj in self.pinned:
            self.pinned.discard(obj)
            self.pinned_bytes -= obj.header.footprint()
        self.in_use.discard(obj)
        self.lru.pop(obj, None)


class Space:
    """Quotas, reservations and eviction of every tier, under the store's lock."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        room: threading.Condition,
        pins: Pins,
        retire: Callable[[CachedObject], None],
    ) -> None:
        """``room``: the store's condition (its lock is the store's), notified when space
        may free up; ``retire``: drops an evicted object from the index and the disk."""
        self._room = room
        self._pins = pins
        self._retire = retire
        self._tiers = {tier: _TierSpace() for tier in tiers}
        self._marks: deque[CachedObject] = deque()

    # -- where each object is ----------------------------------------------------

    def track(self, obj: CachedObject) -> None:
        """``obj`` was indexed: put it in its place (evictable ones as most recent)."""
        with self._room:
            self._put(self._tiers[obj.tier], obj)

    def untrack(self, obj: CachedObject) -> None:
        """``obj`` left the index."""
        with self._room:
            self._tiers[obj.tier].take(obj)

    def refresh(self, obj: CachedObject) -> None:
        """Its pins or users changed: move ``obj`` if its place is another now."""
        with self._room:
            space = self._tiers[obj.tier]
            if not space.holds(obj):
                return  # not indexed
            if self._pins.is_pinned(obj.id):
                if obj in space.pinned:
                    return
            elif obj.users > obj.waiting:
                if obj in space.in_use:
                    return
            elif obj in space.lru:
                return
            space.take(obj)
            self._put(space, obj)

    def _put(self, space: _TierSpace, obj: CachedObject) -> None:
        if self._pins.is_pinned(obj.id):
            space.pinned.add(obj)
            space.pinned_bytes += obj.header.footprint()
        elif obj.users > obj.waiting:
            space.in_use.add(obj)
        else:
            self._apply_marks()  # uses marked before this one stay older
            space.lru[obj] = None
            if obj.superseded:
                space.lru.move_to_end(obj, last=False)

    def supersede(self, obj: CachedObject) -> None:
        """The origin has another version of ``obj``'s URL now: reclaim it first."""
        with self._room:
            obj.superseded = True
            lru = self._tiers[obj.tier].lru
            if obj in lru:
                lru.move_to_end(obj, last=False)

    def mark_used(self, obj: CachedObject) -> None:
        """``obj`` was used now: it becomes the most recent (locks only now and then)."""
        obj.last_used = time.time()
        self._marks.append(obj)
        if len(self._marks) > _QUEUED_MARKS and self._room.acquire(blocking=False):
            try:
                self._apply_marks()
            finally:
                self._room.release()

    def _apply_marks(self) -> None:
        while self._marks:
            obj = self._marks.popleft()
            lru = self._tiers[obj.tier].lru
            if obj in lru and not obj.superseded:
                lru.move_to_end(obj)

    @contextmanager
    def in_use(self, obj: CachedObject) -> Iterator[CachedObject]:
        """Keep ``obj`` from eviction while a reader or filler works on it."""
        with self._room:
            obj.users += 1
            self.refresh(obj)
        try:
            yield obj
        finally:
            with self._room:
                obj.users -= 1
                self.refresh(obj)
                self._room.notify_all()

    def pinned_bytes(self, tier: Tier) -> int:
        """The footprints of ``tier``'s pinned objects, summed."""
        return self._tiers[tier].pinned_bytes

    # -- reservations ------------------------------------------------------------

    def reserve(self, tier: Tier, amount: int, protect: CachedObject) -> bool:
        """Reserve ``amount`` bytes in ``tier``, evicting LRU unpinned objects if needed.

        When every evictable object is busy (being read or filled), wait for one to
        be released, up to ROOM_WAIT_SECONDS; a writer that waits does not keep its
        own object from eviction, so writers waiting on each other cannot deadlock.
        """
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        with self._room:
            while tier.used + tier.reserved + amount > tier.quota:
                if self.evict_one(tier, protect):
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._busy(tier, protect):
                    return False
                protect.waiting += 1
                self.refresh(protect)
                try:
                    self._room.wait(remaining)
                finally:
                    protect.waiting -= 1
                    self.refresh(protect)
                if protect.retired:
                    return False
            tier.reserved += amount
            tier.note_usage()
            return True

    def unreserve(self, tier: Tier, amount: int) -> None:
        with self._room:
            tier.reserved -= amount
            self._room.notify_all()

    def _busy(self, tier: Tier, protect: CachedObject) -> bool:
        """Whether an unpinned object of ``tier`` is in active use (it will be released)."""
        in_use = self._tiers[tier].in_use
        return len(in_use) > (1 if protect in in_use else 0)

    # -- eviction ----------------------------------------------------------------

    def evict_one(self, tier: Tier, protect: CachedObject | None) -> bool:
        """Evict the least recently used evictable object but ``protect``; False if none."""
        with self._room:
            self._apply_marks()
            victim = next((o for o in self._tiers[tier].lru if o is not protect), None)
            if victim is None:
                return False
            log.info("evicting %s from tier %s to make room", victim.header.url, tier.name)
            self._retire(victim)
            tier.evictions += 1
            return True

    def make_room(self, tier: Tier, amount: int, protect: CachedObject) -> bool:
        """After ENOSPC: evict until ``amount`` bytes are freed; False if it cannot."""
        with self._room:
            goal = tier.used - amount
            while tier.used > goal:
                if not self.evict_one(tier, protect=protect):
                    return False
            return True

    def enforce_quota(self, tier: Tier) -> None:
        """After a restart with a smaller quota, or an adopted object: evict until it fits."""
        with self._room:
            while tier.used > tier.quota and self.evict_one(tier, None):
                pass

    def evict(self, obj: CachedObject) -> None:
        """Evict ``obj`` now. Raises QuotaExceededError if pinned, BlockingIOError if busy."""
        with self._room:
            holders = self._pins.holders(obj.id)
            if holders:
                raise QuotaExceededError(
                    f"{obj.header.url} is pinned by {', '.join(holders)}; unpin it first"
                )
            if obj.users:
                raise BlockingIOError(
                    errno.EBUSY, f"{obj.header.url} is being read or filled; try again later"
                )
            self._retire(obj)
            obj.tier.evictions += 1
