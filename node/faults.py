"""Faults for tests: crash points, and a node that lies to its peers.

``CACHEFS_TEST_CRASH_AT=NAME`` (or ``NAME:N`` for the N-th time the point is reached)
makes the process kill itself with SIGKILL there, so tests can prove that a crash at
any point never leaves torn or foreign bytes to be served. Unset, it costs one dict
lookup. Points: ``after-data-write``, ``before-checksum-record``,
``torn-checksum-record``, ``mid-eviction``, ``mid-repair``.

``CACHEFS_TEST_CORRUPT_PEER_BLOCKS=1`` makes a node flip a byte of every block it
serves to a peer (after its checksum was taken), so tests can prove that a peer's
wrong bytes are detected and never stored. ``=recompute`` makes it flip the byte and
send the checksum of the wrong bytes, as a compromised peer would: the block passes
its checksum, and only the origin's digest of the whole object catches it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import xxhash

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("CACHEFS_TEST_CRASH_AT")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or 1)


def should_crash(name: str) -> bool:
    """True when this is the configured hit of the point ``name``."""
    target = _target()
    if target is None or target[0] != name:
        return False
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        return _hits[name] == target[1]


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if the test configured the point ``name``."""
    if should_crash(name):
        os.kill(os.getpid(), signal.SIGKILL)


def lying_peer_block(read: Callable[[], bytes], checksum: int) -> tuple[bytearray, int] | None:
    """The bytes and checksum a lying node sends a peer instead of a block (``read``
    gives its true bytes), or None: the node tells the truth. The test makes it a liar
    with ``CACHEFS_TEST_CORRUPT_PEER_BLOCKS``: ``1`` flips a byte and keeps the true
    checksum, ``recompute`` flips it and sends the wrong bytes' checksum."""
    mode = os.environ.get("CACHEFS_TEST_CORRUPT_PEER_BLOCKS")
    if mode not in ("1", "recompute"):
        return None
    lie = bytearray(read())  # a copy: the block may be shared with local readers
    if not lie:
        return None
    lie[0] ^= 0xFF
    return lie, xxhash.xxh3_64_intdigest(lie) if mode == "recompute" else checksum
