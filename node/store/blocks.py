"""Block I/O: reads that check checksums, writes that record them, and repair.

A block is recorded only after its bytes are written, and served only if they
match the recorded xxh3 checksum (checked once per process, and for a whole object
before its path is handed out). Every read checks that the data file is still the
inode the index holds: another process on the cache directory may have replaced
it. Files that may be held by a reader outside the store (a handed-out path, a
hard link) are never rewritten: a repair copies the good blocks into a new file
that takes the old one's place.

When the origin publishes a digest of the whole object, a complete object is also
checked against it before its path is handed out (once; the meta file records it).
A mismatch drops every block, and the store remembers it: those blocks come from
the origin only, and a second mismatch is an IntegrityError.

A block the disk cannot read (EIO and the like) is dropped and fetched again, as a
corrupt one is, and the error counts against the tier's health. While the tier's
disk hangs, its blocks are not read at all: the caller fetches them elsewhere.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import xxhash

from cachefs.errors import IntegrityError
from cachefs.node import layout
from cachefs.node.faults import crash_point
from cachefs.node.layout import Digest
from cachefs.node.store import digests
from cachefs.node.store.block_writer import BlockLost, BlockWriter
from cachefs.node.store.health import is_fault
from cachefs.node.store.lock import StoreLock
from cachefs.node.store.objects import CachedObject, block_charge
from cachefs.node.store.space import Space

log = logging.getLogger("cachefs.store")
# What _block_xxh3 returns for a block it could not read: never an xxh3-64 (unsigned).
_UNREADABLE = -1


class Blocks:
    """The block operations of one store: ``Store`` hands its block methods to these."""

    def __init__(
        self,
        space: Space,
        lock: StoreLock,
        writer: Callable[[CachedObject, int, int], BlockWriter],
        forget: Callable[[CachedObject], None],
        retire: Callable[[CachedObject], None],
    ) -> None:
        """``writer`` makes the sink of a block (object, index, reserved charge);
        ``forget`` drops an object from the index, ``retire`` from the disk too."""
        self._space = space
        self._lock = lock
        self._writer = writer
        self._forget = forget
        self._retire = retire
        # Objects whose copy failed its origin's digest -> what the bytes gave.
        self._mismatches: dict[str, str] = {}

    # -- writing -----------------------------------------------------------------

    def block_writer(self, obj: CachedObject, index: int) -> BlockWriter | None:
        """A sink that streams block ``index`` into ``obj``'s file; None if no room.

        Order: reserve space, write bytes, then append the checksum record. A crash
        between the two leaves bytes that no record vouches for: they are refetched.
        """
        charge = block_charge(obj.header, index)
        if obj.retired or not obj.tier.health.usable():
            return None  # a degraded tier takes no new blocks: served uncached
        if not self._space.reserve(obj.tier, charge, protect=obj):
            return None
        try:
            return self._writer(obj, index, charge)
        except OSError as exc:
            self._space.unreserve(obj.tier, charge)
            if isinstance(exc, FileNotFoundError):  # evicted by another process
                self._forget(obj)
                return None
            if is_fault(exc):
                obj.tier.health.fault("write", f"opening {obj.header.url} for block {index}", exc)
                return None
            raise

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
        try:
            return writer.commit() is None
        except BlockLost:  # the disk failed under it: the caller has the bytes
            return False

    def note_recorded(
        self, obj: CachedObject, index: int, checksum: int, charge: int, crc: int | None
    ) -> None:
        """A block's record is on disk: its reserved space becomes used. ``crc``: its
        CRC for the origin's digest, when that combines per block."""
        with self._lock:
            obj.tier.reserved -= charge
            obj.tier.used += charge
            obj.charged += charge
            obj.present[index] = checksum
            obj.verified.add(index)
            if crc is None:
                obj.crcs.pop(index, None)
            else:
                obj.crcs[index] = crc
            self._space.mark_used(obj)

    # -- reading -----------------------------------------------------------------

    def read(self, obj: CachedObject, index: int, offset: int, into: memoryview) -> bool:
        """Copy bytes of block ``index`` from ``offset`` within it into ``into``.

        False if the block is absent, present but corrupt or unreadable (then it is
        discarded so the caller refetches it), or on a disk that hangs (then it is
        left alone: the caller fetches it elsewhere).
        """
        checksum = obj.present.get(index)
        if checksum is None or obj.retired or obj.tier.health.stalled():
            return False
        start, end = obj.header.block_span(index)
        try:
            with obj.tier.health.watch("read"):
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
        except OSError as exc:
            self._unreadable(obj, [index], exc)
            return False
        if ok is None:
            self._forget(obj)
            return False
        if not ok:
            self.discard(obj, [index])
            return False
        self._space.mark_used(obj)
        return True

    @contextmanager
    def open_block(self, obj: CachedObject, index: int) -> Iterator[tuple[int, int] | None]:
        """The data file, open, and the checksum of block ``index``, for the kernel to
        send (``sendfile``): a block not verified since the node started is read and
        checked first. None when it is absent, bad (discarded), the file was replaced,
        or the disk hangs. The descriptor is closed on leaving."""
        if obj.retired or obj.tier.health.stalled():
            yield None
            return
        if index not in obj.verified:
            start, end = obj.header.block_span(index)
            if not self.read(obj, index, 0, memoryview(bytearray(end - start))):
                yield None
                return
        checksum = obj.present.get(index)
        try:
            with obj.tier.health.watch("read"):
                fd = os.open(obj.data_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(obj)
            yield None
            return
        except OSError as exc:
            self._unreadable(obj, [index], exc)
            yield None
            return
        try:
            if checksum is None or os.fstat(fd).st_ino != obj.inode:
                yield None
                return
            self._space.mark_used(obj)
            yield fd, checksum
        finally:
            os.close(fd)

    def pread(self, obj: CachedObject, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of verified blocks in one read; None if the file changed,
        the disk failed (the block reads that follow find out which block) or hangs."""
        if obj.tier.health.stalled():
            return None
        try:
            with obj.tier.health.watch("read"):
                fd = os.open(obj.data_path, os.O_RDONLY)
                try:
                    if os.fstat(fd).st_ino != obj.inode:
                        self._forget(obj)
                        return None
                    data = os.pread(fd, end - start, start)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            self._forget(obj)
            return None
        except OSError:
            return None
        if len(data) != end - start:
            return None
        self._space.mark_used(obj)
        return data

    def local_path(self, obj: CachedObject) -> Path | None:
        """The data file of a complete, fully verified object, or None."""
        if not obj.complete or obj.retired or obj.tier.health.stalled():
            return None
        if not self.verify_digest(obj):  # checks unverified blocks on the way
            return None
        if len(obj.verified) != obj.header.block_count and self.verify(obj):
            return None
        obj.handed_out = True
        self._space.mark_used(obj)
        return obj.data_path

    # -- checking and repair -----------------------------------------------------

    def verify(self, obj: CachedObject) -> list[int]:
        """Check every present block against its checksum; discard and return the bad."""
        bad = []
        buffer = bytearray(obj.header.block_size)
        for index, checksum in sorted(obj.present.items()):
            start, end = obj.header.block_span(index)
            view = memoryview(buffer)[: end - start]
            ok = self._read_for_check(obj, index, view, start)
            if ok is None:
                self._forget(obj)
                return sorted(obj.present)
            if ok and xxhash.xxh3_64_intdigest(view) == checksum:
                obj.verified.add(index)
            else:
                bad.append(index)
        if bad:
            self.discard(obj, bad)
        return bad

    # -- the origin's digest -----------------------------------------------------

    def learn_digest(self, obj: CachedObject, digest: Digest) -> None:
        """Give an object made without its origin's digest (from a peer's request, or
        before digests were recorded) that digest. The meta file gets it when the
        object is verified; until then a restart learns it again from the origin."""
        with self._lock:
            if obj.header.digest is None:
                obj.header = dataclasses.replace(obj.header, digest=digest)

    def origin_only(self, object_id: str) -> bool:
        """Whether the object's copy failed its origin's digest: its blocks are then
        fetched from the origin only, never from peers, until it matches."""
        return object_id in self._mismatches

    def verify_digest(self, obj: CachedObject) -> bool:
        """Check a complete object against its origin's digest, once; record success.

        True when it matches (or there is no digest it can be checked against).
        False when a block failed its own checksum, or the object matched no more
        and every block was dropped: the caller fetches them again (from the origin:
        ``origin_only``). A second mismatch after that raises IntegrityError.
        """
        digest = obj.header.digest
        if digest is None or obj.digest_ok or not digests.verifiable(digest):
            return True
        with obj.digest_lock:  # one check per object; others wait for its outcome
            if obj.digest_ok:
                return True
            checked = dict(obj.present)
            actual = self._object_digest(obj, digests.Whole(digest))
            if actual is None:
                return False
            if actual == digest.value:
                return self._record_verified(obj, digest.algorithm, checked)
            repeated = obj.id in self._mismatches
            self._mismatches[obj.id] = actual
            log.warning(
                "%s: the cached copy does not match the origin's %s digest (the origin "
                "says %s, the bytes give %s); dropping it%s",
                obj.header.url,
                digest.algorithm,
                digest.value,
                actual,
                "" if repeated else " and fetching it again from the origin",
            )
            self.discard(obj, sorted(obj.present))
            if repeated:
                raise IntegrityError(
                    f"{obj.header.url}: fetched again from the origin, the object still "
                    f"does not match the {digest.algorithm} digest the origin publishes for "
                    f"it (the origin says {digest.value}, its bytes give {actual}); the "
                    "object at the origin is damaged or its published checksum is wrong: "
                    "upload it again (or fix its checksum) at the origin, then read it again"
                )
        return False

    def _object_digest(self, obj: CachedObject, whole: digests.Whole) -> str | None:
        """The object's digest, from its blocks' CRCs where known, else from its bytes
        (one pass, checking unverified blocks' xxh3 on the way).

        None if a block failed its checksum (discarded) or went missing, or the file
        was replaced by another process (forgotten).
        """
        buffer: memoryview | None = None
        bad = []
        for index in range(obj.header.block_count):
            start, end = obj.header.block_span(index)
            checksum = obj.present.get(index)
            if checksum is None:
                return None  # discarded meanwhile: refetched, then checked again
            crc = obj.crcs.get(index)
            if whole.combines and crc is not None and index in obj.verified:
                whole.add_crc(crc, end - start)
                continue
            if buffer is None:
                buffer = memoryview(bytearray(obj.header.block_size))
            view = buffer[: end - start]
            ok = self._read_for_check(obj, index, view, start)
            if ok is None:
                self._forget(obj)
                return None
            if not ok or (index not in obj.verified and xxhash.xxh3_64_intdigest(view) != checksum):
                bad.append(index)
                continue
            obj.verified.add(index)
            crc = whole.add_bytes(view)
            if crc is not None:
                obj.crcs[index] = crc
        if bad:
            self.discard(obj, bad)
            return None
        return whole.hexdigest()

    def _record_verified(self, obj: CachedObject, algorithm: str, checked: dict[int, int]) -> bool:
        """Note that the blocks ``checked`` matched the digest, in memory and in the
        meta file: a record appended, or the file rewritten with a header that has the
        digest when the object learnt it after it was made."""
        record = layout.encode_verified(algorithm, checked)
        with obj.lock.exclusive(), obj.append_lock:
            with self._lock:
                if obj.retired or obj.present != checked:
                    return False  # repaired or refilled meanwhile: check again
                header = layout.encode_header(obj.header)
            try:
                raw = obj.meta_path.read_bytes()
                if raw.startswith(header):
                    with open(obj.meta_path, "ab") as meta:
                        meta.write(record)
                else:
                    layout.write_file_atomic(
                        obj.meta_path, header + raw.partition(b"\n")[2] + record
                    )
            except OSError as exc:  # verified in this process; a restart checks again
                log.warning("%s: cannot record its verification: %s", obj.header.url, exc)
            obj.digest_ok = True
            self._mismatches.pop(obj.id, None)
        return True

    def check(
        self, obj: CachedObject, index: int, buffer: memoryview, paced: Callable[[int], None]
    ) -> bool | None:
        """Read block ``index`` again and compare it with its record, verified or not.

        For the scrubber: a verified block is served without a check, so a bit that
        flips on the disk later is found only this way. The read takes no lock and
        calls ``paced`` with the size of each chunk it read into ``buffer``; a
        mismatch is read once more under the object's shared lock, which no repair
        or refill of a recorded block can hold at the same time, so that a race is
        not taken for corruption. True: intact. False: corrupt or unreadable, and
        discarded as a corrupt block a reader finds is. None: nothing to judge (the
        block, the object or its file went away meanwhile).
        """
        checksum = obj.present.get(index)
        if checksum is None or obj.retired or obj.tier.health.stalled():
            return None
        actual = _block_xxh3(obj, index, buffer, paced)
        if actual is None or actual == checksum:
            return None if actual is None else True
        with obj.lock.shared():
            if obj.retired or obj.present.get(index) != checksum:
                return None
            actual = _block_xxh3(obj, index, buffer, _unpaced)
        if actual is None or actual == checksum:
            return None if actual is None else True
        self.discard(obj, [index])
        return False

    def _unreadable(self, obj: CachedObject, indices: Sequence[int], exc: OSError) -> None:
        """Blocks the disk could not read: dropped and fetched again, as corrupt ones."""
        for index in indices:
            self._note_unreadable(obj, index, exc)
        self.discard(obj, indices, why="could not be read from the disk")

    def _read_for_check(
        self, obj: CachedObject, index: int, view: memoryview, start: int
    ) -> bool | None:
        """Block ``index`` into ``view`` for a check: False if the disk failed to read
        it (noted in the tier's health), None if the data file was replaced."""
        try:
            with obj.tier.health.watch("read"):
                return _pread_exact(obj.data_path, view, start, obj.inode)
        except OSError as exc:
            self._note_unreadable(obj, index, exc)
            return False

    def _note_unreadable(self, obj: CachedObject, index: int, exc: OSError) -> None:
        if is_fault(exc):
            obj.tier.health.fault("read", f"block {index} of {obj.header.url}", exc)

    def discard(
        self, obj: CachedObject, indices: Sequence[int], why: str = "failed verification"
    ) -> None:
        """Forget corrupt blocks. A file someone may hold is repaired into a new file."""
        # A complete file may be mapped by a reader in any process (open_local), a
        # linked one is in a view: repair those into a new file, never in place.
        # (Its link count is read before the store's lock is taken: no disk I/O under it.)
        linked = False if obj.handed_out or obj.complete else _link_count(obj) > 1
        with self._lock:
            if obj.retired:
                return
            held = obj.handed_out or obj.complete or linked
            obj.digest_ok = False  # other blocks now: the whole is checked again
            for index in indices:
                obj.crcs.pop(index, None)
        log.warning(
            "%s: blocks %s %s; fetching them again",
            obj.header.url,
            list(indices),
            why,
        )
        if held:
            if not self._repair_into_new_file(obj, set(indices)):
                self._retire(obj)
            return
        with obj.lock.exclusive():
            with self._lock:
                for index in indices:
                    if index in obj.present:
                        del obj.present[index]
                        obj.verified.discard(index)
                        charge = block_charge(obj.header, index)
                        obj.charged -= charge
                        obj.tier.used -= charge
                payload = layout.encode_header(obj.header) + b"".join(
                    layout.encode_block(i, c) for i, c in sorted(obj.present.items())
                )
            crash_point("mid-repair")
            try:
                with obj.tier.health.watch("metadata"):
                    layout.write_file_atomic(obj.meta_path, payload)
            except OSError as exc:  # the records stay; a restart checks those blocks again
                if is_fault(exc):
                    obj.tier.health.fault("metadata", f"rewriting {obj.meta_path}", exc)
                log.warning("%s: cannot rewrite its records: %s", obj.header.url, exc)

    def _repair_into_new_file(self, obj: CachedObject, bad: set[int]) -> bool:
        """Copy the good blocks into a new data file and swap it in; False if no room.

        The old file keeps its inode and bytes for whoever holds it; the new one
        lacks the bad blocks, which readers then fetch again.
        """
        keep = {i: c for i, c in obj.present.items() if i not in bad}
        charge = layout.PAGE + sum(block_charge(obj.header, i) for i in keep)
        if not self._space.reserve(obj.tier, charge, protect=obj):
            return False
        final = obj.directory
        staging = final.parent / f".new-{obj.id}-{uuid.uuid4().hex[:8]}"
        retired = layout.trash_dir(obj.tier.root) / f"{obj.id}-{uuid.uuid4().hex[:8]}"
        with obj.lock.exclusive():
            try:
                with obj.tier.health.watch("write"):
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
                    inode = (final / "data").stat().st_ino
            except OSError as exc:
                if is_fault(exc):
                    obj.tier.health.fault("write", f"repairing {obj.header.url}", exc)
                shutil.rmtree(staging, ignore_errors=True)
                self._space.unreserve(obj.tier, charge)
                return False
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


def _block_xxh3(
    obj: CachedObject, index: int, buffer: memoryview, paced: Callable[[int], None]
) -> int | None:
    """The xxh3-64 of block ``index`` as ``obj``'s file holds it, read in chunks.

    _UNREADABLE on an I/O error or a short read (the block fails); None when the
    file is missing or is another file than ours (another process replaced it).
    """
    start, end = obj.header.block_span(index)
    try:
        fd = os.open(obj.data_path, os.O_RDONLY)
    except OSError:
        return None
    hasher = xxhash.xxh3_64()
    try:
        if os.fstat(fd).st_ino != obj.inode:
            return None
        offset = start
        while offset < end:
            with obj.tier.health.watch("read"):
                got = os.preadv(fd, [buffer[: end - offset]], offset)
            if got == 0:
                return _UNREADABLE
            hasher.update(buffer[:got])
            offset += got
            paced(got)
    except OSError as exc:
        if is_fault(exc):
            obj.tier.health.fault("read", f"block {index} of {obj.header.url}", exc)
        return _UNREADABLE
    finally:
        os.close(fd)
    return hasher.intdigest()


def _unpaced(_size: int) -> None:
    """A read that goes as fast as the disk: the confirming read of a failed block."""


def _pread_exact(path: Path, into: memoryview, offset: int, inode: int) -> bool | None:
    """Fill ``into`` from ``path`` at ``offset``.

    True when filled; False on a short read (corruption); None when the file is
    missing or is another file than ours (another process replaced it). Raises
    OSError when the disk fails.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
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


def _link_count(obj: CachedObject) -> int:
    try:
        with obj.tier.health.watch("metadata"):
            return obj.data_path.stat().st_nlink
    except OSError:
        return 1
