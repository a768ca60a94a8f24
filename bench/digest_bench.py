"""What checking an object against its origin's digest costs: CPU-seconds per GiB.

    python bench/digest_bench.py [--size 1GiB] [--runs 3] [--work DIR]

Two kinds of cost, as the store pays them (see node/store/digests.py):

- **Per block, while it streams in.** A fill hashes each chunk (up to 1 MiB, just
  read from the socket, so still in the CPU cache) with xxh3; when the origin's digest
  is a CRC it takes the chunk's CRC too, and the object's CRC is combined from the
  blocks' (one combine per 8 MiB block). Rows: xxh3 alone (what every fill pays
  already), each CRC, and the combines.
- **One pass over the complete file.** A hash (sha256, sha512, sha1, md5) has no
  combine: the whole file is read once (8 MiB at a time, from the page cache here)
  and hashed. The same pass with xxh3 is what a restart's block check costs; with a
  CRC it is what a copy whose CRCs were not kept (after a restart) costs.

CPU time is the process's user + system time (``time.process_time``), per GiB
hashed; the median of ``--runs`` runs. One thread.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import xxhash
from awscrt import checksums

from cachefs.units import parse_size

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = MiB  # what one socket read brings at most (node/origins/ranged_http.py)
BLOCK = 8 * MiB  # the default block size

CHUNK_HASHES: dict[str, Callable[[memoryview], object]] = {
    "xxh3-64 (every fill, today)": xxhash.xxh3_64_intdigest,
    "crc32 (zlib)": zlib.crc32,
    "crc32c (awscrt)": checksums.crc32c,
    "crc64nvme (awscrt)": checksums.crc64nvme,
}
COMBINES: dict[str, Callable[[int, int, int], int]] = {
    "crc32 combine": checksums.combine_crc32,
    "crc32c combine": checksums.combine_crc32c,
    "crc64nvme combine": checksums.combine_crc64nvme,
}
PASSES: dict[str, Callable[[], Callable[[memoryview], None]]] = {
    "sha256 (hashlib)": lambda: hashlib.sha256().update,
    "sha512 (hashlib)": lambda: hashlib.sha512().update,
    "sha1 (hashlib)": lambda: hashlib.sha1().update,
    "md5 (hashlib)": lambda: hashlib.md5().update,
    "xxh3-64 (a restart's block check)": lambda: xxhash.xxh3_64().update,
    "crc64nvme (CRCs not kept)": lambda: _running(checksums.crc64nvme),
}


def _running(crc: Callable[[memoryview, int], int]) -> Callable[[memoryview], None]:
    state = [0]

    def update(data: memoryview) -> None:
        state[0] = crc(data, state[0])

    return update


def cpu_per_gib(work: Callable[[], None], size: int, runs: int) -> float:
    """Median CPU-seconds per GiB of ``work`` (which handles ``size`` bytes)."""
    samples = []
    for _ in range(runs):
        started = time.process_time()
        work()
        samples.append((time.process_time() - started) / (size / GiB))
    return statistics.median(samples)


def per_chunk(fn: Callable[[memoryview], object], size: int) -> Callable[[], None]:
    chunk = memoryview(os.urandom(CHUNK))

    def run() -> None:
        for _ in range(size // CHUNK):
            fn(chunk)

    return run


def per_block_combines(fn: Callable[[int, int, int], int], size: int) -> Callable[[], None]:
    def run() -> None:
        value = 0
        for index in range(size // BLOCK):
            value = fn(value, index * 2654435761 & 0xFFFFFFFF, BLOCK)

    return run


def file_pass(path: Path, make: Callable[[], Callable[[memoryview], None]]) -> Callable[[], None]:
    buffer = memoryview(bytearray(BLOCK))

    def run() -> None:
        update = make()
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while got := os.preadv(fd, [buffer], offset):
                update(buffer[:got])
                offset += got
        finally:
            os.close(fd)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB", help="bytes hashed per run (default 1GiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", help="directory for the file of the pass rows")
    args = parser.parse_args()
    size = max(BLOCK, parse_size(args.size) // BLOCK * BLOCK)

    print(f"{size / GiB:.2f} GiB per run, median of {args.runs} runs, CPU-seconds per GiB\n")
    print("| per block, while it streams in (1 MiB chunks) | CPU-s/GiB | GiB/s of one core |")
    print("|---|---|---|")
    for name, fn in CHUNK_HASHES.items():
        cost = cpu_per_gib(per_chunk(fn, size), size, args.runs)
        print(f"| {name} | {cost:.4f} | {1 / cost:.1f} |")
    for name, fn in COMBINES.items():
        cost = cpu_per_gib(per_block_combines(fn, size), size, args.runs)
        print(f"| {name} (one per 8 MiB block) | {cost:.6f} | - |")

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        path = Path(scratch) / "object.bin"
        with open(path, "wb") as out:
            piece = os.urandom(64 * MiB)
            for _ in range(size // len(piece) or 1):
                out.write(piece[: min(len(piece), size)])
        file_pass(path, PASSES["md5 (hashlib)"])()  # into the page cache
        print("\n| one pass over the complete file (8 MiB reads, page cache) | CPU-s/GiB | GiB/s |")
        print("|---|---|---|")
        for name, make in PASSES.items():
            cost = cpu_per_gib(file_pass(path, make), size, args.runs)
            print(f"| {name} | {cost:.4f} | {1 / cost:.1f} |")


if __name__ == "__main__":
    main()
