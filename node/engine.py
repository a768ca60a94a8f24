"""The read path: stat, pin a version, serve blocks from the store or fill them once.

``Engine.read`` resolves an object to a version (revalidated after
``revalidate_after`` seconds) and serves every byte of the read from that version.
A missing block is filled once however many readers want it (single flight): the
first asks the origin, writes the block to the store, records its checksum, and
only then do the readers read it. Sequential readers get read-ahead. ``prefetch``
runs the same fills for every block of a source's manifest, many at a time.

Where the origin publishes a digest of the whole object, a complete object is
checked against it before it is handed out (a prefetch's end, ``open_local``, and
the store's ``local_path``); a copy that fails is fetched again from the origin,
never from peers, once: failing again is an IntegrityError.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from cachefs import ranges
from cachefs.errors import (
    IntegrityError,
    JobCancelledError,
    QuotaExceededError,
    VersionChangedError,
)
from cachefs.node import faults
from cachefs.node.config import Config
from cachefs.node.flights import Flights
from cachefs.node.store import health
from cachefs.node.store.block_writer import BlockLost, BlockWriter
from cachefs.types import JobStatus

if TYPE_CHECKING:
    from cachefs.node.cluster.peers import Peers
from cachefs.node.layout import Digest, ObjectHeader
from cachefs.node.origins import ObjectRef, Origin
from cachefs.node.sinks import BufferSink
from cachefs.node.stats import EngineStats
from cachefs.node.store import CachedObject, Store
from cachefs.node.store.ownership import EMBEDDED, Owner
from cachefs.units import format_size
from cachefs.urls import object_id, parse_url

_MAX_ATTEMPTS = 3
_CANCEL_POLL = 0.1  # seconds between looks at a prefetch's cancel flag
log = logging.getLogger("cachefs.engine")
_SEQUENTIAL_TRACKED = 1024
_KNOWN_REFS = 4096
# Stats kept for ``revalidate_after``, least recently used dropped first: a node that
# serves many objects must not keep one entry per URL it ever saw.
_STAT_CACHE_ENTRIES = 16384


@dataclass
class Progress:
    """Byte-level progress of a prefetch; ``done`` counts cached bytes, old and new."""

    bytes_total: int = 0
    bytes_done: int = 0
    objects_total: int = 0
    objects_done: int = 0
    fetched_bytes: int = 0  # from origins
    peer_bytes: int = 0  # from other nodes
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def status(self, job_id: str, sources: Sequence[str], pin: str | None) -> JobStatus:
        """This progress as a running job's status."""
        return JobStatus(
            id=job_id,
            state="running",
            sources=tuple(sources),
            pin_holder=pin,
            bytes_total=self.bytes_total,
            bytes_done=self.bytes_done,
            objects_total=self.objects_total,
            objects_done=self.objects_done,
            fetched_bytes=self.fetched_bytes,
            peer_bytes=self.peer_bytes,
            seconds=self.elapsed,
        )


@dataclass(frozen=True)
class Filled:
    """How a block fill ended: where its bytes came from, and them if uncached."""

    # "origin", "peer", "local" (another fill got there first), or "skipped" (its
    # prefetch was cancelled or failed before it started: nothing was filled)
    source: str
    data: bytearray | None = None  # set when no tier had room: served without caching


@dataclass(frozen=True)
class Manifest:
    """A source resolved once: its objects and their versions at that moment."""

    sources: tuple[str, ...]
    objects: tuple[ObjectRef, ...]

    @property
    def size(self) -> int:
        return sum(ref.size for ref in self.objects)


@dataclass(frozen=True)
class PrefetchResult:
    manifest: Manifest
    bytes: int
    objects: int
    fetched_bytes: int
    peer_bytes: int
    cached_before: int
    evicted_during: int
    seconds: float
    pinned_by: str | None

    def status(self, job_id: str) -> JobStatus:
        """This outcome as a finished job's status."""
        return JobStatus(
            id=job_id,
            state="succeeded",
            sources=self.manifest.sources,
            pin_holder=self.pinned_by,
            bytes_total=self.bytes,
            bytes_done=self.bytes,
            objects_total=self.objects,
            objects_done=self.objects,
            fetched_bytes=self.fetched_bytes,
            peer_bytes=self.peer_bytes,
            cached_before=self.cached_before,
            evicted_during=self.evicted_during,
            seconds=self.seconds,
        )


@dataclass(frozen=True)
class PeerBlock:
    """A block as a node sends it to a peer: ``length`` bytes of the open data file
    ``fd`` from ``offset`` (sent by the kernel), or ``data`` when it is not stored."""

    checksum: int  # xxh3-64 of the block, recorded when it was fetched
    length: int
    fd: int | None = None
    offset: int = 0
    data: bytes | bytearray | None = None

    def read(self) -> bytes:
        """The block's bytes (for the few paths that cannot send from the file)."""
        if self.data is not None:
            return bytes(self.data)
        assert self.fd is not None
        return os.pread(self.fd, self.length, self.offset)

    def as_sent(self) -> PeerBlock:
        """This block, or what a node a test made a liar sends instead."""
        lie = faults.lying_peer_block(self.read, self.checksum)
        return self if lie is None else PeerBlock(lie[1], len(lie[0]), data=lie[0])


class Engine:
    """One node's cache: a store of tiers in front of the origins."""

    def __init__(
        self,
        config: Config,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        peers: Peers | None = None,
        owner: Owner = EMBEDDED,
    ) -> None:
        """``peers``: the cluster's other nodes, asked for blocks before the origin;
        ``owner``: who claims the cache directories (a node, or embedded mode)."""
        self.config = config
        self.peers = peers
        # Called with each manifest a prefetch completed (every object cached).
        self.complete_listeners: list[Callable[[Manifest], None]] = []
        self.stats = EngineStats()
        self.store = Store(config.tiers, config.group, owner)
        self.origin = Origin(config, options, observe=self.stats.observe_origin)
        # As wide as the origins' adaptive limits allow (node/origins/fill_pool.py).
        self._pool: ThreadPoolExecutor = self.origin.slots.fill_pool(
            config.concurrency, "cachefs-fill"
        )
        self._flights: Flights[tuple[str, int], Filled] = Flights(self._pool)
        self._stat_cache: OrderedDict[str, tuple[float, ObjectRef]] = OrderedDict()
        # Refs handed out recently, by object id: a reader in another process that
        # pinned one gets it back whole (with the ETag its fills must carry).
        self._known_refs: OrderedDict[str, ObjectRef] = OrderedDict()
        self._refs_lock = threading.Lock()
        self._read_ends: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.release_directories()

    # -- metadata ----------------------------------------------------------------

    def stat(self, url: str, fresh: bool = False) -> ObjectRef:
        """The object's current version, from cache until ``revalidate_after`` passes;
        ``fresh``: from the origin now (the cached one may be older than a version
        another node saw)."""
        parsed = parse_url(url)
        now = time.monotonic()
        with self._refs_lock:
            cached = self._stat_cache.get(parsed.canonical)
            if cached is not None:
                self._stat_cache.move_to_end(parsed.canonical)
        if cached is not None and not fresh and now - cached[0] < self.config.revalidate_after:
            # Same object, but fetch with this caller's URL (its own presigned query).
            ref = dataclasses.replace(cached[1], url=parsed)
        else:
            ref = self.origin.stat(parsed)
            self._remember(ref, now)
        obj = self.store.get(ref.id)
        if obj is not None and ref.digest is not None and obj.header.digest is None:
            self.store.learn_digest(obj, ref.digest)  # made from a peer's request: no digest
        return ref

    def pinned(self, url: str, version: str) -> ObjectRef:
        """``url`` at ``version``: the pin of a reader that stat'ed it earlier.

        A version handed out recently is served as it is (its fills carry its ETag,
        so an origin that changed since answers VersionChangedError, never other
        bytes); an unknown one must still be the origin's current version.
        """
        if not version:
            return self.stat(url)
        parsed = parse_url(url)
        with self._refs_lock:
            known = self._known_refs.get(object_id(parsed.canonical, version))
        if known is not None:
            return dataclasses.replace(known, url=parsed)
        current = self.stat(url)
        if current.version != version:
            raise VersionChangedError(
                current.canonical, version, f"the origin now has version {current.version}"
            )
        return current

    def _remember(self, ref: ObjectRef, now: float) -> None:
        """``ref`` is the origin's version now (older ones cached are superseded)."""
        self.store.note_current(ref.canonical, ref.id)
        with self._refs_lock:
            self._stat_cache[ref.canonical] = (now, ref)
            self._stat_cache.move_to_end(ref.canonical)
            while len(self._stat_cache) > _STAT_CACHE_ENTRIES:
                self._stat_cache.popitem(last=False)
            self._known_refs[ref.id] = ref
            self._known_refs.move_to_end(ref.id)
            while len(self._known_refs) > _KNOWN_REFS:
                self._known_refs.popitem(last=False)

    def _forget_stat(self, ref: ObjectRef) -> None:
        """Drop the cached stat of ``ref``'s URL if it still names ``ref``'s version."""
        with self._refs_lock:
            cached = self._stat_cache.get(ref.canonical)
            if cached is not None and cached[1].version == ref.version:
                del self._stat_cache[ref.canonical]

    def header(self, ref: ObjectRef) -> ObjectHeader:
        obj = self.store.get(ref.id)
        block_size = obj.header.block_size if obj else self.config.block_size
        digest = ref.digest or (obj.header.digest if obj else None)
        return ObjectHeader(ref.id, ref.canonical, ref.version, ref.size, block_size, digest)

    def _origin_digest(self, ref: ObjectRef) -> Digest | None:
        """The origin's digest of ``ref``'s version. A ref from another node carries
        none: it is looked up in the refs this node stat'ed, else by one stat."""
        if ref.digest is not None:
            return ref.digest
        with self._refs_lock:
            known = self._known_refs.get(ref.id)
        if known is None:
            try:
                current = self.origin.stat(ref.url)
            except OSError as exc:  # checked when the object is next stat'ed here
                log.warning("%s: cannot learn its digest now: %s", ref.canonical, exc)
                return None
            if current.version != ref.version:
                return None
            self._remember(current, time.monotonic())
            known = current
        return known.digest

    def resolve(self, sources: Sequence[str]) -> Manifest:
        refs: dict[str, ObjectRef] = {}
        for source in sources:
            for ref in self.origin.resolve(source):
                refs.setdefault(ref.id, ref)
                self._remember(ref, time.monotonic())
        return Manifest(tuple(sources), tuple(refs.values()))

    # -- reads -------------------------------------------------------------------

    def read(self, url: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset + length) of the object's current version."""
        return self.read_ref(self.stat(url), offset, None if length is None else offset + length)

    def read_ref(self, ref: ObjectRef, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of ``ref``'s version; ``end`` None or past the size clips."""
        start, end = ranges.clipped(ref.canonical, ref.size, start, end)
        if start == end:
            return b""
        fast = self._read_verified_range(ref, start, end)
        if fast is not None:
            return fast
        buffer = bytearray(end - start)
        self.readinto_ref(ref, start, memoryview(buffer))
        return bytes(buffer)

    def _read_verified_range(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        """One pread when every block of the range is cached and verified."""
        obj = self.store.get(ref.id)
        if obj is None:
            return None
        bs = obj.header.block_size
        blocks = range(start // bs, (end - 1) // bs + 1)
        if not all(i in obj.verified and i in obj.present for i in blocks):
            return None
        data = self.store.pread(obj, start, end)
        if data is not None:
            self.stats.served("local", end - start)
            self._note_sequential(ref, start, end, obj)
        return data

    def readinto_ref(self, ref: ObjectRef, start: int, into: memoryview) -> None:
        """Fill ``into`` with the bytes of ``ref`` from ``start``."""
        end = ranges.exact(ref.canonical, ref.size, start, len(into))
        if start == end:
            return
        obj = self.store.place(self.header(ref))
        # Blocks as the stored object cuts them: another process may have made it.
        bs = obj.header.block_size if obj is not None else self.config.block_size
        first, last = start // bs, (end - 1) // bs
        with self._holding(obj):
            if obj is not None:
                missing = [i for i in range(first, last + 1) if i not in obj.present]
            else:
                missing = list(range(first, last + 1))
            # One block is filled in this thread: no queueing behind the pool.
            pending = self._flights.run_first(
                ((ref.id, i), partial(self._fill, ref, obj, i)) for i in missing
            )
            for index in range(first, last + 1):
                self._copy_block(ref, obj, index, pending.get((ref.id, index)), start, into)
        self._note_sequential(ref, start, end, obj)

    def _copy_block(
        self,
        ref: ObjectRef,
        obj: CachedObject | None,
        index: int,
        future: Future[Filled] | None,
        start: int,
        into: memoryview,
    ) -> None:
        header = obj.header if obj else self.header(ref)
        block_start, block_end = header.block_span(index)
        low, high = max(start, block_start), min(start + len(into), block_end)
        dest = into[low - start : high - start]
        for _attempt in range(_MAX_ATTEMPTS):
            filled = self._outcome(ref, obj, index, future) if future is not None else None
            if filled is not None and filled.source == "skipped":
                filled = None  # a cancelled prefetch's fill that never started
            if filled is not None and filled.data is not None:
                dest[:] = memoryview(filled.data)[low - block_start : high - block_start]
                self.stats.served(filled.source, high - low)
                return
            if obj is not None and self.store.read(obj, index, low - block_start, dest):
                self.stats.served(filled.source if filled else "local", high - low)
                return
            # Evicted, replaced or found corrupt since: place again and refill.
            obj = self.store.place(self.header(ref))
            future = self._flights.run((ref.id, index), partial(self._fill, ref, obj, index))
        raise IntegrityError(
            f"{ref.canonical}: block {index} could not be read back intact after "
            f"{_MAX_ATTEMPTS} attempts; check the cache disk"
        )

    def _outcome(
        self, ref: ObjectRef, obj: CachedObject | None, index: int, future: Future[Filled]
    ) -> Filled:
        """A fill's outcome. One held up past the store's deadline by a disk that hangs
        is left to finish on its own, and the block is fetched again, uncached."""
        while True:
            try:
                return future.result(timeout=health.IO_DEADLINE)
            except FutureTimeout:
                if obj is not None and self.store.stalled(obj):
                    log.warning(
                        "%s: block %d waits on tier %r, whose disk hangs; fetching it again",
                        ref.canonical,
                        index,
                        obj.tier.name,
                    )
                    return self._fill(ref, None, index)

    def _holding(self, obj: CachedObject | None) -> AbstractContextManager[Any]:
        return self.store.in_use(obj) if obj is not None else nullcontext()

    # -- fills -------------------------------------------------------------------

    def _fill(
        self, ref: ObjectRef, obj: CachedObject | None, index: int, forwarded: bool = False
    ) -> Filled:
        """Fetch one block from a peer or the origin, streaming it into the store.

        The bytes are in the store when this returns, unless no tier had room: then
        ``Filled.data`` holds them and they are served without caching. ``forwarded``:
        a peer asked this node to fill it, so no other owner is asked.
        """
        if obj is not None and index in obj.present and not obj.retired:
            if not self.store.stalled(obj):
                return Filled("local")
            obj = None  # its disk hangs: fetched again, served uncached
        header = obj.header if obj else self.header(ref)
        start, end = header.block_span(index)
        with self._holding(obj):  # no eviction between placing, reserving and writing
            writer = self.store.block_writer(obj, index) if obj is not None else None
            sink: BlockWriter | BufferSink = writer or BufferSink(end - start)
            try:
                # A copy that failed the origin's digest comes from the origin only.
                asks_peers = self.peers is not None and not self.store.origin_only(ref.id)
                peer = self.peers.fill(ref, header, index, sink, forwarded) if asks_peers else None
                if peer is None:
                    self.origin.read(ref, start, end, sink)
            except BaseException as exc:
                if writer is not None:
                    writer.close()
                if isinstance(exc, VersionChangedError):
                    self._forget_stat(ref)  # so opening it again sees the new version
                raise
            try:
                data = writer.commit() if writer is not None else sink.buffer  # type: ignore[union-attr]
            except BlockLost:  # the disk failed under it: the block again, into memory
                sink = BufferSink(end - start)
                self.origin.read(ref, start, end, sink)
                data, peer = sink.buffer, None
        source = "origin" if peer is None else "peer"
        self.stats.fetched(end - start, source)
        if data is None:
            return Filled(source)
        for _attempt in range(_MAX_ATTEMPTS):
            if obj is None or not obj.retired:
                break  # no room: serve it uncached
            obj = self.store.place(header, obj.tier.name)  # evicted while it filled: again
            if obj is not None:
                with self.store.in_use(obj):
                    if not obj.retired and self.store.write_block(obj, index, memoryview(data)):
                        return Filled(source)
        self.stats.uncached(end - start)
        return Filled(source, data)

    def _note_sequential(
        self, ref: ObjectRef, start: int, end: int, obj: CachedObject | None
    ) -> None:
        """Start read-ahead fills when a reader continues where it left off."""
        previous = self._read_ends.pop(ref.id, None)
        self._read_ends[ref.id] = end
        if len(self._read_ends) > _SEQUENTIAL_TRACKED:
            self._read_ends.popitem(last=False)
        if previous != start or obj is None or self.config.readahead_blocks <= 0:
            return
        bs = obj.header.block_size
        first = (end - 1) // bs + 1
        for index in range(
            first, min(first + self.config.readahead_blocks, obj.header.block_count)
        ):
            if index not in obj.present:
                self._flights.submit((ref.id, index), partial(self._fill, ref, obj, index))

    # -- peers -------------------------------------------------------------------

    @contextmanager
    def block_for_peer(
        self, ref: ObjectRef, block_size: int, index: int, fill: bool, forwarded: bool
    ) -> Iterator[PeerBlock | None]:
        """Block ``index`` of ``ref`` for another node, while the caller sends it.

        From the store if present: the data file's range, verified (a block not
        checked since the node started is read and checked first), held from
        eviction while it is sent; else filled once (single flight with every local
        reader and every other asker) when ``fill``; else None. A block no tier had
        room for comes as bytes.
        """
        obj = self.store.get(ref.id)
        if obj is not None and obj.header.block_size != block_size:
            raise ValueError(
                f"{ref.canonical} is cut into blocks of {obj.header.block_size} bytes on this "
                f"node, not {block_size}: give every node the same block_size"
            )
        header = ObjectHeader(ref.id, ref.canonical, ref.version, ref.size, block_size)
        if not 0 <= index < header.block_count:
            raise ValueError(f"{ref.canonical} has no block {index}")
        start, end = header.block_span(index)
        for _attempt in range(_MAX_ATTEMPTS):
            obj = self.store.get(ref.id)
            if obj is not None and index in obj.present:
                with self.store.in_use(obj), self.store.open_block(obj, index) as opened:
                    if opened is not None:
                        fd, checksum = opened
                        self.stats.to_peer(end - start)
                        yield PeerBlock(checksum, end - start, fd, start).as_sent()
                        return
            if not fill:
                yield None
                return
            obj = self.store.place(header)
            work = partial(self._fill, ref, obj, index, forwarded)
            filled = self._flights.run((ref.id, index), work).result()
            if filled.data is not None:  # no room here: hand on what was fetched
                self.stats.to_peer(end - start)
                data = filled.data
                yield PeerBlock(xxhash.xxh3_64_intdigest(data), len(data), data=data).as_sent()
                return
        raise IntegrityError(
            f"{ref.canonical}: block {index} could not be read back intact for a peer"
        )

    # -- prefetch ----------------------------------------------------------------

    def prefetch(
        self,
        sources: Sequence[str],
        pin: str | None = None,
        tier: str | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> PrefetchResult:
        """Fetch every block of ``sources`` into the store, many blocks in flight."""
        if tier is not None:
            self.store.tier(tier)
        manifest = self.resolve(sources)
        return self.prefetch_manifest(manifest, pin=pin, tier=tier, progress=progress)

    def prefetch_manifest(
        self,
        manifest: Manifest,
        pin: str | None = None,
        tier: str | None = None,
        progress: Callable[[Progress], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> PrefetchResult:
        """Fetch every block of ``manifest``, many in flight. Once ``cancelled`` is set
        no new block starts, the pins this call added are released and
        ``JobCancelledError`` is raised; blocks already fetched stay cached."""
        state = Progress(bytes_total=manifest.size, objects_total=len(manifest.objects))
        log.info(
            "prefetch of %s: %d objects, %d bytes",
            ", ".join(parse_url(s).canonical for s in manifest.sources),
            len(manifest.objects),
            manifest.size,
        )
        objects, newly_pinned = self._place_all(manifest, pin, tier)
        fills: list[tuple[ObjectRef, CachedObject, int]] = []
        remaining: dict[str, int] = {}
        for ref, obj in objects:
            missing = [i for i in range(obj.header.block_count) if i not in obj.present]
            remaining[ref.id] = len(missing)
            state.bytes_done += obj.cached_bytes
            if not missing:
                state.objects_done += 1
            fills.extend((ref, obj, index) for index in missing)
        cached_before = state.bytes_done
        if progress:
            progress(dataclasses.replace(state))
        uncached: list[str] = []

        def on_filled(ref: ObjectRef, obj: CachedObject, index: int, filled: Filled) -> None:
            start, end = obj.header.block_span(index)
            if filled.data is not None:
                uncached.append(ref.canonical)
            state.bytes_done += end - start
            if filled.source == "peer":
                state.peer_bytes += end - start
            elif filled.source == "origin":
                state.fetched_bytes += end - start
            remaining[ref.id] -= 1
            if remaining[ref.id] == 0:
                state.objects_done += 1
            if progress:
                progress(dataclasses.replace(state))

        if self.peers is not None:
            fills = self.peers.fill_order(fills, lambda fill: (fill[0].id, fill[2]))
        try:
            self._fill_all(fills, on_filled, cancelled)
        except JobCancelledError:
            if pin is not None and newly_pinned:
                self.store.unpin(pin, newly_pinned)
            raise
        if uncached:
            raise QuotaExceededError(
                f"{len(uncached)} blocks of {uncached[0]} could not be cached: no tier had "
                "room (quota or disk full) beside pinned and in-use objects; raise the quota, "
                "free disk space or unpin something"
                + (f" ({trouble})" if (trouble := self.store.trouble()) else "")
            )
        for ref, _ in objects:
            state.fetched_bytes += self._check_digest(ref, tier)
        evicted = sum(
            1 for ref, _ in objects if not (o := self.store.get(ref.id)) or not o.complete
        )
        if not evicted:
            for listener in list(self.complete_listeners):
                listener(manifest)
        return PrefetchResult(
            manifest=manifest,
            bytes=manifest.size,
            objects=len(manifest.objects),
            fetched_bytes=state.fetched_bytes,
            peer_bytes=state.peer_bytes,
            cached_before=cached_before,
            evicted_during=evicted,
            seconds=state.elapsed,
            pinned_by=pin,
        )

    def _place_all(
        self, manifest: Manifest, pin: str | None, tier: str | None
    ) -> tuple[list[tuple[ObjectRef, CachedObject]], list[str]]:
        """Every object placed (and pinned); the ids this call pinned anew."""
        placed: list[tuple[ObjectRef, CachedObject]] = []
        newly_pinned: list[str] = []
        try:
            for ref in manifest.objects:
                was_pinned = pin is not None and pin in self.store.holders(ref.id)
                obj = self.store.place(self.header(ref), tier, pin)
                if pin is not None and not was_pinned:
                    newly_pinned.append(ref.id)
                if obj is None:
                    raise QuotaExceededError(
                        f"{ref.canonical} ({format_size(ref.size)}) fits in no tier: "
                        + (
                            self.store.trouble()
                            or ", ".join(
                                f"{t.name} has a quota of {format_size(t.quota)}"
                                for t in self.store.tiers
                            )
                            + "; raise a quota or free space"
                        )
                    )
                placed.append((ref, obj))
        except BaseException:
            if pin is not None and newly_pinned:
                self.store.unpin(pin, newly_pinned)
            raise
        return placed, newly_pinned

    def _fill_all(
        self,
        fills: Sequence[tuple[ObjectRef, CachedObject, int]],
        on_filled: Callable[[ObjectRef, CachedObject, int, Filled], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        """Fill every (ref, object, block) on the pool; ``on_filled`` runs in this
        thread as each lands. On the first failure, or once ``cancelled`` is set, the
        fills not yet started are skipped and this raises at once: fills in flight
        finish on their own and stay cached."""
        stop = threading.Event()

        def submit(ref: ObjectRef, obj: CachedObject, index: int) -> Future[Filled]:
            work = partial(self._fill_unless_stopped, stop, ref, obj, index)
            return self._flights.submit((ref.id, index), work)

        pending = {submit(*fill): fill for fill in fills}
        try:
            while pending:
                done, _ = wait(pending, timeout=_CANCEL_POLL, return_when=FIRST_COMPLETED)
                if cancelled is not None and cancelled.is_set():
                    raise JobCancelledError(
                        "the prefetch was cancelled; the blocks it fetched stay cached"
                    )
                for future in done:
                    fill = pending.pop(future)
                    filled = future.result()  # a failed fill raises here
                    if filled.source == "skipped":  # joined another prefetch's, stopped
                        pending[submit(*fill)] = fill
                    elif on_filled is not None:
                        on_filled(*fill, filled)
        finally:
            if pending:
                stop.set()

    def _fill_unless_stopped(
        self, stop: threading.Event, ref: ObjectRef, obj: CachedObject, index: int
    ) -> Filled:
        """A prefetch's fill, which starts only if its prefetch still wants it."""
        if stop.is_set():
            return Filled("skipped")
        return self._fill(ref, obj, index)

    def _check_digest(self, ref: ObjectRef, tier: str | None) -> int:
        """Check a complete object against its origin's digest. A copy that fails is
        fetched again (from the origin only) and checked again: failing a second time
        raises IntegrityError. The bytes fetched again from the origin."""
        fetched = 0
        for _attempt in range(_MAX_ATTEMPTS):
            obj = self.store.get(ref.id)
            if obj is None or not obj.complete:
                return fetched  # evicted meanwhile: checked once it is complete again
            if obj.header.digest is None:
                digest = self._origin_digest(ref)
                if digest is None:
                    return fetched  # the origin publishes none: its blocks are checked
                self.store.learn_digest(obj, digest)
            if self.store.verify_digest(obj):
                return fetched
            fetched += self._refill(ref, tier)
        raise IntegrityError(
            f"{ref.canonical}: could not produce an intact copy after {_MAX_ATTEMPTS} "
            "attempts; check the cache disk"
        )

    def _refill(self, ref: ObjectRef, tier: str | None) -> int:
        """Fill the blocks a check dropped; the bytes that came from the origin."""
        obj = self.store.place(self.header(ref), tier)
        if obj is None:
            return 0  # no room for it any more: the next look finds it incomplete
        fetched = [0]

        def count(_ref: ObjectRef, obj: CachedObject, index: int, filled: Filled) -> None:
            if filled.source == "origin":
                start, end = obj.header.block_span(index)
                fetched[0] += end - start

        missing = [i for i in range(obj.header.block_count) if i not in obj.present]
        with self.store.in_use(obj):
            self._fill_all([(ref, obj, i) for i in missing], count)
        return fetched[0]

    # -- whole objects -----------------------------------------------------------

    def open_local(self, url: str) -> Path:
        """The path of the complete, verified cached file of ``url``'s current version:
        every block against its checksum, the whole against the origin's digest."""
        ref = self.stat(url)
        for _attempt in range(_MAX_ATTEMPTS):
            obj = self.store.get(ref.id)
            if obj is None or not obj.complete:
                self.prefetch_manifest(Manifest((url,), (ref,)))
                obj = self.store.get(ref.id)
            if obj is not None:
                path = self.store.local_path(obj)  # IntegrityError: failed again from the origin
                if path is not None:
                    return path
        raise IntegrityError(
            f"{ref.canonical}: could not produce an intact local copy after "
            f"{_MAX_ATTEMPTS} attempts; check the cache disk"
        )
