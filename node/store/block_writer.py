"""Streams one block into its object's data file as the origin's bytes arrive.

Space is reserved before the first byte; each chunk is written where it belongs
while it is still in the CPU cache (no block-sized buffer per fill) and hashed on
the way (and, when the origin's digest is a CRC, its CRC too: the object's is
combined from the blocks'); the block is recorded only after its last byte is
written. A retried origin read calls ``begin`` and the block starts again. When the
disk fills up and nothing can be evicted, the disk fails (an I/O error writing the
bytes or their record), or the object is retired meanwhile, the writer falls back
to memory: what it wrote is read back and the block is served without caching. If
a failing disk cannot give back what was written either, ``commit`` raises
``BlockLost`` and the caller fetches the block again into memory.
"""

from __future__ import annotations

import errno
import os
import signal
from contextlib import AbstractContextManager, ExitStack
from typing import Protocol

import xxhash

from cachefs.errors import IntegrityError
from cachefs.node import layout
from cachefs.node.faults import crash_point, should_crash
from cachefs.node.store.digests import block_crc
from cachefs.node.store.health import is_fault
from cachefs.node.store.objects import CachedObject, Tier

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class BlockLost(Exception):
    """A block's bytes went to a disk that failed and cannot be read back: fetch it
    again (into memory: the tier will not take it)."""


class StoreSide(Protocol):
    """What a writer needs of the ``Store`` that made it (a Protocol, so that this
    module need not import the store package's ``__init__``, which imports it)."""

    def in_use(self, obj: CachedObject) -> AbstractContextManager[CachedObject]: ...

    def forget(self, obj: CachedObject) -> None: ...

    def make_room(self, tier: Tier, amount: int, protect: CachedObject) -> bool: ...

    def note_recorded(
        self, obj: CachedObject, index: int, checksum: int, charge: int, crc: int | None
    ) -> None: ...

    def unreserve(self, tier: Tier, amount: int) -> None: ...


class BlockWriter:
    """A sink for one block of one cached object. Make it with ``Store.block_writer``."""

    def __init__(self, store: StoreSide, obj: CachedObject, index: int, charge: int) -> None:
        self._store = store
        self._obj = obj
        self._index = index
        self._charge = charge
        self._start, self._end = obj.header.block_span(index)
        self._offset = self._start
        self._hasher = xxhash.xxh3_64()
        self._crc_of = block_crc(obj.header.digest)
        self._crc = 0
        self._memory: bytearray | None = None  # set once the block cannot be cached
        self._lost = False  # the disk failed and lost what was written so far
        self._held = ExitStack()  # in use (no eviction) and a shared lock (no repair)
        self._held.enter_context(store.in_use(obj))
        self._held.enter_context(obj.lock.shared())
        try:
            with obj.tier.health.watch("write"):
                self._fd = os.open(obj.data_path, os.O_RDWR)
        except BaseException:
            self._held.close()
            raise
        self._reserved = True
        if os.fstat(self._fd).st_ino != obj.inode:  # another process replaced the file
            store.forget(obj)
            self._to_memory()

    # -- the sink ----------------------------------------------------------------

    def begin(self) -> None:
        self._offset = self._start
        self._hasher.reset()
        self._crc = 0
        if self._memory is not None:
            self._memory.clear()
            self._lost = False  # the block starts again: every byte lands in memory

    def write(self, chunk: memoryview) -> None:
        if self._offset + len(chunk) > self._end:
            raise ValueError(f"{self._obj.header.url}: more bytes than block {self._index} holds")
        self._hasher.update(chunk)
        if self._crc_of is not None:
            self._crc = self._crc_of(chunk, self._crc)
        if self._memory is None:
            self._write_to_file(chunk)
        if self._memory is not None:
            self._memory += chunk
        self._offset += len(chunk)

    def xxh3(self) -> int:
        """The xxh3-64 of the block's bytes written so far (``HashingSink``)."""
        return self._hasher.intdigest()

    def _write_to_file(self, chunk: memoryview) -> None:
        done = 0
        health = self._obj.tier.health
        while done < len(chunk):
            try:
                with health.watch("write"):
                    done += os.pwrite(self._fd, chunk[done:], self._offset + done)
            except OSError as exc:
                if is_fault(exc):
                    health.fault("write", self._what(), exc)
                    self._to_memory()
                    return
                if exc.errno not in _NO_SPACE:
                    raise
                if not self._store.make_room(self._obj.tier, self._charge, self._obj):
                    self._to_memory()
                    return

    def _what(self) -> str:
        return f"block {self._index} of {self._obj.header.url}"

    def _to_memory(self) -> None:
        """Keep the block in memory from here on, with what was written so far (lost,
        if the disk cannot give it back)."""
        try:
            with self._obj.tier.health.watch("read"):
                written = os.pread(self._fd, self._offset - self._start, self._start)
            if len(written) != self._offset - self._start:
                raise OSError(errno.EIO, "short read of what was written")
        except OSError as exc:
            if is_fault(exc):
                self._obj.tier.health.fault("read", self._what(), exc)
            written, self._lost = b"", True
        self._memory = bytearray(written)
        self._release_reservation()

    # -- the end -----------------------------------------------------------------

    def commit(self) -> bytearray | None:
        """Record the block: None when it is in the store, else its bytes (uncached)."""
        try:
            if self._offset != self._end:
                raise IntegrityError(
                    f"{self._obj.header.url}: block {self._index} got "
                    f"{self._offset - self._start} of {self._end - self._start} bytes"
                )
            if self._memory is None and not self._obj.retired:
                crash_point("after-data-write")
                try:
                    self._record(self._hasher.intdigest())
                    return None
                except OSError as exc:  # not recorded: served uncached
                    if exc.errno not in _NO_SPACE and not is_fault(exc):
                        raise
                    if is_fault(exc):
                        self._obj.tier.health.fault("write", f"the record of {self._what()}", exc)
            if self._memory is None:  # retired while we wrote: our inode still has it
                self._to_memory()
            if self._lost:
                raise BlockLost(f"{self._obj.header.url}: block {self._index} was lost by the disk")
            return self._memory
        finally:
            self.close()

    def _record(self, checksum: int) -> None:
        record = layout.encode_block(self._index, checksum)
        crash_point("before-checksum-record")
        obj = self._obj
        # One append at a time: each record is one write, whole or absent.
        with obj.append_lock, obj.tier.health.watch("write"), open(obj.meta_path, "ab") as meta:
            if should_crash("torn-checksum-record"):  # this record only
                meta.write(record[: len(record) // 2])
                meta.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            meta.write(record)
        crc = self._crc if self._crc_of is not None else None
        self._store.note_recorded(obj, self._index, checksum, self._charge, crc)
        self._reserved = False

    def _release_reservation(self) -> None:
        if self._reserved:
            self._reserved = False
            self._store.unreserve(self._obj.tier, self._charge)

    def close(self) -> None:
        """Give back what the writer holds; a block not recorded stays unrecorded."""
        self._release_reservation()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._held.close()
