"""Rendezvous hashing: which nodes own a block, best first.

Every node scores every member with xxh3 of (member, block key) and sorts: the top
one owns the block, the next ones are its fallbacks. All nodes with the same member
list agree without talking. When a node joins, it takes over exactly the blocks it
now scores highest on, and their previous owner is its next-ranked node, which is
where a joining node looks before the origin.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash


def block_key(object_id: str, index: int) -> str:
    return f"{object_id}:{index}"


def rank(key: str, members: Sequence[str]) -> list[str]:
    """``members`` ordered by their score for ``key``, owner first."""
    return sorted(
        members,
        key=lambda member: (xxhash.xxh3_64_intdigest(f"{member}\0{key}".encode()), member),
        reverse=True,
    )
