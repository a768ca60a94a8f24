"""An origin's digest of a whole object, computed from the cached blocks.

CRCs (crc32, crc32c, crc64nvme) combine: each block's CRC is taken while its bytes
stream in, next to its xxh3, and the object's CRC is combined from the blocks' (GF(2)
arithmetic, a fraction of a microsecond a block) without reading a byte again.
Hashes (sha256, sha512, sha1, md5) have no such algebra: they need one sequential
pass over the complete file. zlib computes CRC32; awscrt (the AWS common runtime,
the C code botocore uses for the same checksums) CRC32C, CRC64NVME and every combine.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from typing import Any

from cachefs.node.layout import Digest

# CRC algorithms and the hex digits of their values.
CRC_DIGITS = {"crc32": 8, "crc32c": 8, "crc64nvme": 16}
HASHES = frozenset({"sha256", "sha512", "sha1", "md5"})

BlockCRC = Callable[[Any, int], int]  # (bytes-like, previous CRC) -> CRC


def verifiable(digest: Digest | None) -> bool:
    """Whether cachefs can check a copy against ``digest`` (a composite one it cannot)."""
    return digest is not None and (digest.algorithm in CRC_DIGITS or digest.algorithm in HASHES)


def block_crc(digest: Digest | None) -> BlockCRC | None:
    """The running CRC to take of each block for ``digest``; None unless it combines."""
    if digest is None or digest.algorithm not in CRC_DIGITS:
        return None
    if digest.algorithm == "crc32":
        return zlib.crc32
    checksums = _checksums()
    return checksums.crc32c if digest.algorithm == "crc32c" else checksums.crc64nvme


class Whole:
    """The digest of a whole object, fed its blocks in order: a block's CRC where it is
    known and the digest combines (``add_crc``), else the block's bytes."""

    def __init__(self, digest: Digest) -> None:
        self.algorithm = digest.algorithm
        self._crc_of = block_crc(digest)
        self._value = 0  # the CRC of no bytes
        self._hasher: Any = None
        if self._crc_of is None:  # a content check, allowed where FIPS forbids md5 for security
            self._hasher = hashlib.new(self.algorithm, usedforsecurity=False)
        else:
            checksums = _checksums()
            self._combine: Callable[[int, int, int], int] = {
                "crc32": checksums.combine_crc32,
                "crc32c": checksums.combine_crc32c,
                "crc64nvme": checksums.combine_crc64nvme,
            }[self.algorithm]

    @property
    def combines(self) -> bool:
        return self._crc_of is not None

    def add_crc(self, crc: int, length: int) -> None:
        self._value = self._combine(self._value, crc, length)

    def add_bytes(self, block: Any) -> int | None:
        """Feed a block's bytes; its CRC, when the digest combines (to keep)."""
        if self._crc_of is None:
            self._hasher.update(block)
            return None
        crc = self._crc_of(block, 0)
        self.add_crc(crc, len(block))
        return crc

    def hexdigest(self) -> str:
        if self._crc_of is None:
            return str(self._hasher.hexdigest())
        return f"{self._value:0{CRC_DIGITS[self.algorithm]}x}"


def _checksums() -> Any:
    try:
        from awscrt import checksums
    except ImportError as exc:
        raise ImportError(
            "checking an object against its origin's CRC needs awscrt; install cachefs "
            "with the extra of that origin, e.g. pip install 'cachefs[s3]'"
        ) from exc
    return checksums
