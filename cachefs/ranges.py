"""Byte ranges of an object, checked the same way by the engine, the node and clients.

Two kinds of read: ``read(start, end)`` clips ``end`` to the object's size (as a
file's read does), ``readinto(start, buffer)`` must be filled exactly. A range that
cannot be served raises a ValueError that names the object and its size.
"""

from __future__ import annotations


def clipped(url: str, size: int, start: int, end: int | None) -> tuple[int, int]:
    """[start, end) of a read: ``end`` None or past the size means to the end."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(
            f"invalid range [{start}, {end}) for {url}: offsets must be non-negative and "
            "end must not precede start"
        )
    if start > size:
        raise ValueError(f"offset {start} is past the end of {url} ({size} bytes)")
    return start, size if end is None else min(end, size)


def exact(url: str, size: int, start: int, length: int) -> int:
    """The end of a read that must fill ``length`` bytes from ``start``."""
    end = start + length
    if start < 0 or end > size:
        raise ValueError(f"invalid range [{start}, {end}) for {url} ({size} bytes)")
    return end
