"""The store's data model: tiers, the objects in them, and each object's file lock.

Plain records. The Store keeps them consistent under its one lock; the index, pins,
space and blocks modules each update their part (``used`` and ``charged`` by the
index and the blocks, ``reserved`` and ``high_water`` by space).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cachefs.node import layout
from cachefs.node.config import TierConfig
from cachefs.node.layout import ObjectHeader
from cachefs.node.store.digests import verifiable
from cachefs.node.store.health import TierHealth
from cachefs.node.store.ownership import Claim


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
    # Each verified block's CRC in the algorithm of the origin's digest, when that
    # combines per block; and whether the complete object matched the digest.
    crcs: dict[int, int] = field(default_factory=dict)
    digest_ok: bool = False
    charged: int = 0
    last_used: float = field(default_factory=time.time)
    users: int = 0
    waiting: int = 0  # users blocked waiting for room: they do not keep it from eviction
    handed_out: bool = False
    retired: bool = False
    superseded: bool = False  # the origin has another version now: evicted first
    inode: int = 0
    lock: SharedLock = field(default_factory=SharedLock)
    append_lock: threading.Lock = field(default_factory=threading.Lock)
    digest_lock: threading.Lock = field(default_factory=threading.Lock)  # one check at a time

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
    def verification(self) -> str:
        """What the object is checked against: its origin's digest algorithm once the
        complete object matched it, "pending" before, "blocks" when the origin
        publishes no digest (each block's xxh3 only), "unverifiable" when it publishes
        one that cannot be checked against the bytes (an S3 composite checksum)."""
        digest = self.header.digest
        if digest is None:
            return "blocks"
        if not verifiable(digest):
            return "unverifiable"
        return digest.algorithm if self.digest_ok else "pending"

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
    # Ids whose directory is on its way to the trash: not made again here until gone.
    retiring: Counter[str] = field(default_factory=Counter)
    full: str | None = None  # why the last object could not be made here (full disk)
    claim: Claim | None = None  # this process's lock on the root (ownership)
    health: TierHealth = field(init=False)

    def __post_init__(self) -> None:
        self.health = TierHealth(self.config.name, self.config.path)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def root(self) -> Path:
        return self.config.path

    def note_usage(self) -> None:
        self.high_water = max(self.high_water, self.used + self.reserved)


def block_charge(header: ObjectHeader, index: int) -> int:
    """What block ``index`` costs its tier once recorded: its bytes, rounded up to pages."""
    start, end = header.block_span(index)
    return layout.round_up(end - start)
