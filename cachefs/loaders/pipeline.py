"""Moving tensor bytes from shards into tensors: large parallel reads, bounded memory.

Every shard's header is read once, and its tensors are allocated where they will
live (``torch.empty`` on the target device, each tensor its own storage). The data
region is cut into chunks of ``chunk_size`` bytes (a chunk spans many small
tensors, and a large tensor spans many chunks), which ``threads`` workers read in
file order:

* **direct** (``device="cpu"``): a chunk is read with one ``preadv`` straight into
  the tensors' own storage; no byte is copied twice.
* **staged** (any other device, or ``staged=True``): a worker takes a buffer from a
  ``BufferPool`` (pinned host memory for CUDA), reads the chunk into it and copies
  each piece to its tensor: on CUDA asynchronously, on one stream per worker, so the
  copy of one chunk overlaps the reads of the next ones. The buffer goes back to the
  pool when its copies are done, so host memory stays at the pool's size whatever
  the model's size; a worker waits for a free buffer.

Tensors are yielded in file order as each one's last byte lands.
"""

from __future__ import annotations

import ctypes
import mmap as mmap_module
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from cachefs.loaders.errors import DeviceOutOfMemoryError, SafetensorsFormatError
from cachefs.loaders.format import DTYPE_SIZES, Header, TensorEntry, parse_header
from cachefs.loaders.sources import MAX_THREADS, Resolved, Shard, resolve

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 32 * MiB
DEFAULT_POOL_SIZE = 256 * MiB  # pinned (or staged) host memory of one load
# Tensors further apart than this are read separately rather than with the gap.
_MAX_GAP = 1 * MiB

_TORCH_DTYPES: dict[str, Any] = {
    name: getattr(torch, attr, None)
    for name, attr in {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "I16": "int16",
        "U16": "uint16",
        "F16": "float16",
        "BF16": "bfloat16",
        "I32": "int32",
        "U32": "uint32",
        "F32": "float32",
        "C64": "complex64",
        "I64": "int64",
        "U64": "uint64",
        "F64": "float64",
    }.items()
}


# torch.OutOfMemoryError is torch >= 2.5's name for torch.cuda.OutOfMemoryError.
_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview (no numpy needed).

    The view does not keep the tensor alive: its holder must.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def known_dtype(name: str) -> bool:
    """Whether this torch has a dtype for the safetensors dtype ``name``."""
    dtype = _TORCH_DTYPES.get(name)
    return dtype is not None and dtype.itemsize == DTYPE_SIZES[name]


def default_threads(staged: bool) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, min(8 if staged else 4, cpus or 2))


# -- the staging pool ---------------------------------------------------------------


class BufferPool:
    """At most ``buffers`` host buffers of ``buffer_size`` bytes, made on first use.

    ``allocated`` counts the buffers ever made and ``peak_in_use`` the most held at
    once: neither exceeds ``buffers``, however large the model. A pool can be given
    to several loads (one after another or at once) so pinned memory is made once.
    """

    def __init__(self, buffer_size: int, buffers: int, pin_memory: bool = False) -> None:
        if buffer_size <= 0 or buffers <= 0:
            raise ValueError(
                f"a buffer pool needs a positive buffer size and count, not {buffers} x "
                f"{buffer_size} bytes"
            )
        self.buffer_size = buffer_size
        self.buffers = buffers
        self.pin_memory = pin_memory
        self.allocated = 0
        self.in_use = 0
        self.peak_in_use = 0
        self._free: list[torch.Tensor] = []
        self._cond = threading.Condition()

    @property
    def capacity_bytes(self) -> int:
        return self.buffer_size * self.buffers

    def acquire(self, stop: threading.Event | None = None) -> torch.Tensor | None:
        """A free buffer (uint8, ``buffer_size`` bytes); None once ``stop`` is set."""
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    return None
                if self._free:
                    buffer = self._free.pop()
                    break
                if self.allocated < self.buffers:
                    self.allocated += 1  # counted before the (slow, unlocked) allocation
                    buffer = None
                    break
                self._cond.wait(0.1)
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        if buffer is None:
            try:
                buffer = torch.empty(
                    self.buffer_size, dtype=torch.uint8, pin_memory=self.pin_memory
                )
            except BaseException:
                with self._cond:
                    self.allocated -= 1
                    self.in_use -= 1
                    self._cond.notify()
                raise
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buffer)
            self.in_use -= 1
            self._cond.notify()


_shared_pools: dict[tuple[str, int, int], BufferPool] = {}
_shared_lock = threading.Lock()


def shared_pool(device: torch.device, buffer_size: int, buffers: int) -> BufferPool:
    """The process's pool for this device and geometry: pinned memory is made once."""
    key = (str(device), buffer_size, buffers)
    with _shared_lock:
        pool = _shared_pools.get(key)
        if pool is None:
            pool = BufferPool(buffer_size, buffers, pin_memory=device.type == "cuda")
            _shared_pools[key] = pool
        return pool


# -- copies to the device -------------------------------------------------------------


_Callback = Callable[[bool, "BaseException | None"], None]


class _Completions:
    """Runs each callback once its fence is reached, in a thread of its own, so a
    worker goes on reading while its copies are in flight. A callback gets whether
    its copies succeeded."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, _Callback] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cachefs-loader-copies")
        self._thread.daemon = True
        self._thread.start()

    def add(self, fence: Any, callback: _Callback) -> None:
        self._queue.put((fence, callback))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fence, callback = item
            try:
                fence.synchronize()
            except BaseException as exc:
                callback(False, exc)
            else:
                callback(True, None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class _Reached:
    def synchronize(self) -> None:
        pass


class _HostCopies:
    """Staged copies into CPU tensors: done when ``copy`` returns (their fences are
    reached at once, and go through the same completion thread as CUDA's)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def fence(self) -> Any:
        return _Reached()

    def drain(self) -> None:
        pass


class _CudaCopies:
    """Asynchronous host-to-device copies from pinned buffers, a stream per worker."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._local = threading.local()
        self._streams: list[Any] = []
        self._lock = threading.Lock()

    def _stream(self) -> Any:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(device=self.device)
            self._local.stream = stream
            with self._lock:
                self._streams.append(stream)
        return stream

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self._stream()):
            dst.copy_(src, non_blocking=True)

    def fence(self) -> Any:
        event = torch.cuda.Event()
        event.record(self._stream())
        return event

    def drain(self) -> None:
        """Wait for every copy issued (before tensors are handed out or dropped)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.synchronize()


# -- the plan ---------------------------------------------------------------------------


@dataclass
class _Tensor:
    entry: TensorEntry
    shard: Shard
    dtype: Any
    raw: torch.Tensor | None  # uint8, entry.nbytes bytes, on the target device
    view: memoryview | None = None  # raw's bytes, for direct reads
    remaining: int = 0


@dataclass
class _Chunk:
    shard: Shard
    start: int  # file offsets [start, end)
    end: int
    pieces: list[tuple[_Tensor, int, int]]  # (tensor, file offset, length)


@dataclass
class LoadStats:
    """What one load did, for tests and benchmarks."""

    mode: str = ""  # "direct" or "staged"
    device: str = ""
    files: int = 0
    tensors: int = 0
    bytes: int = 0  # tensor bytes moved
    chunks: int = 0
    threads: int = 0
    seconds: float = 0.0
    pool_buffers: int = 0
    pool_buffer_size: int = 0
    pool_allocated: int = 0
    pool_peak_in_use: int = 0
    local_reads: int = 0  # chunk reads from local files, and through the cache client
    client_reads: int = 0
    prefetch_error: str | None = None
    first_tensor_seconds: float | None = None
    mapped_bytes: int = 0  # tensor bytes mapped from files (mmap=True), not read
    extra: dict[str, Any] = field(default_factory=dict)


def _device(device: str | int | torch.device) -> torch.device:
    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asked for, but this torch sees no CUDA device "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type not in ("cpu",):
        raise ValueError(f"device {str(device)!r}: the loader handles cpu and cuda devices")
    return device


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. 'bfloat16', torch.float16)")
    return value


def _empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A tensor's own uninitialised storage (the one allocation point, for tests)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


class SafetensorsLoader:
    """One load of a source: iterate it for ``(name, tensor)`` pairs as they land.

    ``stats`` describes the load once the iteration has ended. See
    ``cachefs.loaders.iter_safetensors`` for the arguments.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        device: str | int | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        threads: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool: BufferPool | None = None,
        staged: bool | None = None,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        prefetch: bool = True,
        mmap: bool = False,
    ) -> None:
        self.source = source
        self.device = _device(device)
        self.dtype = _dtype(dtype)
        self.staged = self.device.type != "cpu" if staged is None else bool(staged)
        if self.device.type != "cpu" and not self.staged:
            raise ValueError(f"loading onto {self.device} always goes through the staging pool")
        if mmap and self.staged:
            raise ValueError("mmap=True maps files into CPU tensors: not with a staged load")
        self.mmap = mmap
        if pool is not None:
            chunk_size = pool.buffer_size
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.chunk_size = chunk_size
        self.pool = pool
        self.pool_buffers = max(1, pool_size // chunk_size) if pool is None else pool.buffers
        self.threads = threads or default_threads(self.staged)
        if self.staged:
            self.threads = max(1, min(self.threads, self.pool_buffers))
        self.storage_options = storage_options
        self.filesystem = filesystem
        self.prefetch = prefetch
        self.stats = LoadStats(
            mode="staged" if self.staged else "direct",
            device=str(self.device),
            threads=self.threads,
        )
        self._started = False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._started:
            raise RuntimeError("a SafetensorsLoader loads once; make another to load again")
        self._started = True
        return self._run()

    # -- the load --------------------------------------------------------------------

    def _run(self) -> Iterator[tuple[str, torch.Tensor]]:
        started = time.perf_counter()
        resolved = resolve(self.source, self.storage_options, self.filesystem)
        finished = False
        try:
            headers = self._headers(resolved)
            _check_index(resolved, headers)
            tensors = self._allocate(resolved, headers)
            chunks = _plan(tensors, self.chunk_size)
            self.stats.files = len(headers)
            self.stats.tensors = len(tensors)
            self.stats.bytes = sum(t.entry.nbytes for t in tensors)
            self.stats.chunks = len(chunks)
            yield from self._move(tensors, chunks, started)
            finished = True
        finally:
            if resolved.prefetch is not None:
                if finished:
                    resolved.prefetch.join(10.0)  # every byte is read: it is ending too
                error = resolved.prefetch.error
                self.stats.prefetch_error = None if error is None else str(error)
            for shard in resolved.shards:
                self.stats.local_reads += getattr(shard, "local_reads", 0)
                self.stats.client_reads += getattr(shard, "client_reads", 0)
            resolved.close()
            self.stats.seconds = time.perf_counter() - started

    def _headers(self, resolved: Resolved) -> list[Header]:
        """Every shard's header, all asked for at once and before the background
        prefetch starts: a header is the first thing the load needs of a shard, and
        behind the prefetch's queue of tensor blocks it would arrive last."""
        shards = resolved.shards
        with ThreadPoolExecutor(min(MAX_THREADS, len(shards)), "cachefs-loader-header") as pool:
            futures = [pool.submit(self._header, shard) for shard in shards]
            if self.prefetch:
                resolved.start_prefetch()
            return [future.result() for future in futures]

    def _header(self, shard: Shard) -> Header:
        """The header, with reads that each start at the file's first byte: a read that
        starts where the previous one ended looks sequential to the cache, which would
        then read ahead the blocks after the header, before those the load needs first."""
        return parse_header(
            shard.name, shard.size, lambda start, end: shard.read(0, end)[start:], known_dtype
        )

    def _allocate(self, resolved: Resolved, headers: list[Header]) -> list[_Tensor]:
        tensors: list[_Tensor] = []
        seen: dict[str, str] = {}
        allocated = 0
        for shard, header in zip(resolved.shards, headers, strict=True):
            mapped = self._map(shard)
            for entry in header.tensors:
                if entry.name in seen:
                    raise SafetensorsFormatError(
                        shard.name, f"is also in {seen[entry.name]}", entry.name
                    )
                seen[entry.name] = shard.name
                dtype = _TORCH_DTYPES[entry.dtype]
                if mapped is not None and entry.nbytes and entry.begin % dtype.itemsize == 0:
                    # Zero copy: the file's pages, copy-on-write; ready at once.
                    raw = torch.frombuffer(
                        mapped, dtype=torch.uint8, count=entry.nbytes, offset=entry.begin
                    )
                    tensors.append(_Tensor(entry, shard, dtype, raw))
                    self.stats.mapped_bytes += entry.nbytes
                    continue
                try:
                    raw = _empty(entry.nbytes, self.device)
                except _OUT_OF_MEMORY as exc:
                    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise DeviceOutOfMemoryError(
                        shard.name,
                        entry.name,
                        entry.nbytes,
                        str(self.device),
                        allocated,
                        first_line or type(exc).__name__,
                    ) from exc
                allocated += entry.nbytes
                tensor = _Tensor(entry, shard, dtype, raw)
                tensor.remaining = entry.nbytes
                if not self.staged and entry.nbytes:
                    tensor.view = host_bytes(raw)
                tensors.append(tensor)
        return tensors

    def _map(self, shard: Shard) -> mmap_module.mmap | None:
        """A private (copy-on-write) map of a complete local shard, with ``mmap=True``."""
        fd = shard.local_fd() if self.mmap else None
        if fd is None or shard.size == 0:
            return None
        return mmap_module.mmap(fd, shard.size, access=mmap_module.ACCESS_COPY)

    def _move(
        self, tensors: list[_Tensor], chunks: list[_Chunk], started: float
    ) -> Iterator[tuple[str, torch.Tensor]]:
        done = threading.Condition()
        stop = threading.Event()
        errors: list[BaseException] = []
        position = [0]
        pool = None
        copies: _HostCopies | _CudaCopies | None = None
        completions: _Completions | None = None
        if self.staged and chunks:
            pool = self.pool or (
                shared_pool(self.device, self.chunk_size, self.pool_buffers)
                if self.device.type == "cuda"
                else BufferPool(self.chunk_size, self.pool_buffers)
            )
            copies = _CudaCopies(self.device) if self.device.type == "cuda" else _HostCopies()
            completions = _Completions()

        def landed(pieces: list[tuple[_Tensor, int, int]]) -> None:
            with done:
                for tensor, _offset, length in pieces:
                    tensor.remaining -= length
                done.notify_all()

        def next_chunk() -> _Chunk | None:
            with done:
                if stop.is_set() or position[0] >= len(chunks):
                    return None
                chunk = chunks[position[0]]
                position[0] += 1
                return chunk

        def failed(exc: BaseException) -> None:
            with done:
                errors.append(exc)
                stop.set()
                done.notify_all()

        def work() -> None:
            try:
                while (chunk := next_chunk()) is not None:
                    if pool is None:
                        _read_direct(chunk)
                        landed(chunk.pieces)
                    elif not self._read_staged(
                        chunk, pool, copies, completions, stop, landed, failed
                    ):
                        return
            except BaseException as exc:
                failed(exc)

        workers = [
            threading.Thread(target=work, name=f"cachefs-loader-{i}", daemon=True)
            for i in range(min(self.threads, max(1, len(chunks))))
        ]
        for worker in workers:
            worker.start()
        try:
            for tensor in tensors:
                with done:
                    while tensor.remaining > 0 and not errors:
                        done.wait(0.5)
                    if errors:
                        raise errors[0]
                out = self._finish(tensor)
                if self.stats.first_tensor_seconds is None:
                    self.stats.first_tensor_seconds = time.perf_counter() - started
                yield tensor.entry.name, out
        finally:
            stop.set()
            for worker in workers:
                worker.join()
            if completions is not None:
                completions.close()
            if copies is not None:
                copies.drain()  # no copy may still be writing into memory we let go
            if pool is not None:
                self.stats.pool_buffers = pool.buffers
                self.stats.pool_buffer_size = pool.buffer_size
                self.stats.pool_allocated = pool.allocated
                self.stats.pool_peak_in_use = pool.peak_in_use

    def _read_staged(
        self,
        chunk: _Chunk,
        pool: BufferPool,
        copies: Any,
        completions: Any,
        stop: threading.Event,
        landed: Callable[[list[tuple[_Tensor, int, int]]], None],
        failed: Callable[[BaseException], None],
    ) -> bool:
        try:
            buffer = pool.acquire(stop)
        except _OUT_OF_MEMORY as exc:
            raise DeviceOutOfMemoryError(
                chunk.shard.name,
                None,
                pool.buffer_size,
                "pinned host" if pool.pin_memory else "host",
                (pool.allocated - 1) * pool.buffer_size,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            ) from exc
        if buffer is None:
            return False
        try:
            length = chunk.end - chunk.start
            chunk.shard.readinto(chunk.start, [host_bytes(buffer)[:length]])
            for tensor, offset, size in chunk.pieces:
                low = offset - tensor.entry.begin
                src = buffer[offset - chunk.start : offset - chunk.start + size]
                copies.copy(tensor.raw[low : low + size], src)  # type: ignore[index]
            fence = copies.fence()
        except BaseException:
            pool.release(buffer)
            raise

        def release(ok: bool, error: BaseException | None) -> None:
            pool.release(buffer)
            if ok:
                landed(chunk.pieces)
            else:
                failed(error or RuntimeError("a copy to the device failed"))

        completions.add(fence, release)
        return True

    def _finish(self, tensor: _Tensor) -> torch.Tensor:
        raw, tensor.raw, tensor.view = tensor.raw, None, None
        assert raw is not None
        entry = tensor.entry
        out = raw.view(tensor.dtype).reshape(entry.shape)
        if (
            self.dtype is not None
            and out.dtype != self.dtype
            and out.is_floating_point()
            and self.dtype.is_floating_point
        ):
            out = out.to(self.dtype)
        return out


def _read_direct(chunk: _Chunk) -> None:
    """One chunk into its tensors' own storage: a ``preadv`` per contiguous run."""
    run_start: int | None = None
    run_end = 0
    views: list[memoryview] = []
    for tensor, offset, length in chunk.pieces:
        low = offset - tensor.entry.begin
        view = tensor.view[low : low + length]  # type: ignore[index]
        if length >= _POPULATE_MIN and tensor.raw is not None:
            populate(tensor.raw.data_ptr() + low, length)
        if run_start is not None and offset != run_end:
            chunk.shard.readinto(run_start, views)
            run_start, views = None, []
        if run_start is None:
            run_start = offset
        views.append(view)
        run_end = offset + length
    if run_start is not None:
        chunk.shard.readinto(run_start, views)


_POPULATE_MIN = 1 * MiB  # smaller pieces: a syscall for a few faults does not pay
_MADV_POPULATE_WRITE = 23  # Linux 5.14's <sys/mman.h>
_madvise: Any = None


def populate(address: int, nbytes: int) -> bool:
    """Fault in the whole 4 KiB pages of fresh memory ``[address, +nbytes)`` with one
    ``madvise(MADV_POPULATE_WRITE)`` before a read fills them: one system call instead
    of a page fault per page (reading 2 GiB into fresh tensors took about a fifth less
    CPU). Elsewhere (older kernels, not Linux) the read faults them in as before."""
    global _madvise
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return False
    page = mmap_module.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end <= start:
        return False
    if _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        _madvise = False  # not this kernel: stop asking
        return False
    return True


def _plan(tensors: list[_Tensor], chunk_size: int) -> list[_Chunk]:
    """Chunks of at most ``chunk_size`` bytes over each shard's tensors, in file order."""
    chunks: list[_Chunk] = []
    by_shard: dict[int, list[_Tensor]] = {}
    for tensor in tensors:
        if tensor.remaining:
            by_shard.setdefault(id(tensor.shard), []).append(tensor)
    for group in by_shard.values():
        group.sort(key=lambda t: t.entry.begin)
        current: _Chunk | None = None
        for tensor in group:
            offset, end = tensor.entry.begin, tensor.entry.end
            while offset < end:
                if current is not None and (
                    offset - current.end > _MAX_GAP or current.end - current.start >= chunk_size
                ):
                    chunks.append(current)
                    current = None
                if current is None:
                    current = _Chunk(tensor.shard, offset, offset, [])
                room = chunk_size - (offset - current.start)
                if room <= 0:
                    chunks.append(current)
                    current = None
                    continue
                length = min(end - offset, room)
                current.pieces.append((tensor, offset, length))
                current.end = offset + length
                offset += length
        if current is not None:
            chunks.append(current)
    return chunks


def _check_index(resolved: Resolved, headers: list[Header]) -> None:
    """Every tensor the index places in a shard must be in that shard."""
    if resolved.index is None:
        return
    present = {h.file: {e.name for e in h.tensors} for h in headers}
    for tensor, file in resolved.weight_map.items():
        if tensor not in present.get(file, ()):
            raise SafetensorsFormatError(
                resolved.index, f"is placed in {file}, which has no tensor of that name", tensor
            )
