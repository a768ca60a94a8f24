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


def corrupt_peer_blocks() -> bool:
    return os.environ.get("CACHEFS_TEST_CORRUPT_PEER_BLOCKS") == "1"


def lying_peer_block(data: bytearray, checksum: int) -> tuple[bytearray, int]:
    """A block and its checksum as a node sends them to a peer: unchanged, unless the
    test made it a liar that flips a byte and sends the wrong bytes' checksum."""
    if os.environ.get("CACHEFS_TEST_CORRUPT_PEER_BLOCKS") != "recompute" or not data:
        return data, checksum
    lie = bytearray(data)  # a copy: the block may be shared with local readers
    lie[0] ^= 0xFF
    return lie, xxhash.xxh3_64_intdigest(lie)
