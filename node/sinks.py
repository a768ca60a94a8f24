"""Where an origin read's bytes go, as they arrive.

An origin read hands each chunk of the body to a sink, in order. ``begin`` starts
the range again: a retried read calls it before resending. The store's block
writer is a sink that writes into the cache file; ``BufferSink`` keeps the bytes
in memory (for blocks served without caching, and small reads).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class Sink(Protocol):
    def begin(self) -> None:
        """Forget what was written: the range starts again from its first byte."""

    def write(self, chunk: memoryview) -> None:
        """The next bytes of the range."""


@runtime_checkable
class HashingSink(Sink, Protocol):
    """A sink that hashes what it is given anyway (the store's block writer): a peer
    read checks the owner's checksum against its hash rather than hashing twice."""

    def xxh3(self) -> int:
        """The xxh3-64 of the bytes written since ``begin``."""


class BufferSink:
    """Collects a range of known length in one preallocated buffer."""

    def __init__(self, length: int) -> None:
        self.buffer = bytearray(length)
        self._view = memoryview(self.buffer)
        self.filled = 0

    def begin(self) -> None:
        self.filled = 0

    def write(self, chunk: memoryview) -> None:
        end = self.filled + len(chunk)
        if end > len(self.buffer):
            raise ValueError(f"{end} bytes for a range of {len(self.buffer)}")
        self._view[self.filled : end] = chunk
        self.filled = end
