"""Block I/O: reads that check checksums, writes that record them, and repair.

A block is recorded only after its bytes are written, and served only if they
match the recorded xxh3 checksum (checked once per process, and for a whole object
before its path is handed out). Every read checks that the data file is still the
inode the index holds: another process on the cache directory may have replaced
it. Files that may be held by a reader outside the store (a handed-out path, a
hard link) are never rewritten: a repair copies the good blocks into a new file
that takes the old one's place.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import xxhash

from cachefs.node import layout
from cachefs.node.faults import crash_point
from cachefs.node.store.block_writer import BlockWriter
from cachefs.node.store.objects import CachedObject, block_charge
from cachefs.node.store.space import Space

log = logging.getLogger("cachefs.store")


class Blocks:
    """The block operations of one store: ``Store`` hands its block methods to these."""

    def __init__(
        self,
        space: Space,
        lock: threading.RLock,
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

    # -- writing -----------------------------------------------------------------

    def block_writer(self, obj: CachedObject, index: int) -> BlockWriter | None:
        """A sink that streams block ``index`` into ``obj``'s file; None if no room.

        Order: reserve space, write bytes, then append the checksum record. A crash
        between the two leaves bytes that no record vouches for: they are refetched.
        """
        charge = block_charge(obj.header, index)
        if obj.retired or not self._space.reserve(obj.tier, charge, protect=obj):
            return None
        try:
            return self._writer(obj, index, charge)
        except FileNotFoundError:  # evicted by another process on this cache directory
            self._space.unreserve(obj.tier, charge)
            self._forget(obj)
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

    def note_recorded(self, obj: CachedObject, index: int, checksum: int, charge: int) -> None:
        """A block's record is on disk: its reserved space becomes used."""
        with self._lock:
            obj.tier.reserved -= charge
            obj.tier.used += charge
            obj.charged += charge
            obj.present[index] = checksum
            obj.verified.add(index)
            self._space.mark_used(obj)

    # -- reading -----------------------------------------------------------------

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
            self._forget(obj)
            return False
        if not ok:
            self.discard(obj, [index])
            return False
        self._space.mark_used(obj)
        return True

    def pread(self, obj: CachedObject, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of verified blocks in one read; None if the file changed."""
        try:
            fd = os.open(obj.data_path, os.O_RDONLY)
        except OSError:
            self._forget(obj)
            return None
        try:
            if os.fstat(fd).st_ino != obj.inode:
                self._forget(obj)
                return None
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        if len(data) != end - start:
            return None
        self._space.mark_used(obj)
        return data

    def local_path(self, obj: CachedObject) -> Path | None:
        """The data file of a complete, fully verified object, or None."""
        if not obj.complete or obj.retired:
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
            ok = _pread_exact(obj.data_path, view, start, obj.inode)
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
            layout.write_file_atomic(obj.meta_path, payload)

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
                self._space.unreserve(obj.tier, charge)
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


def _link_count(path: Path) -> int:
    try:
        return path.stat().st_nlink
    except OSError:
        return 1
