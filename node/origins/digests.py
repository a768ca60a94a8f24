"""An origin's own digest of a whole object, as each kind of origin publishes it.

- S3: ``HeadObject`` with ``ChecksumMode=ENABLED`` answers the checksum of the
  algorithm the object was uploaded with (``ChecksumCRC64NVME``, ``ChecksumCRC32C``,
  ``ChecksumCRC32``, ``ChecksumSHA256``, ``ChecksumSHA1``: base64 of big-endian
  bytes). A multipart upload's COMPOSITE checksum (``value-N``) is a checksum of
  the parts' checksums: it is kept as ``<algorithm>-composite``, which cannot be
  checked without the part boundaries (``GetObjectAttributes``' ``ObjectParts``,
  which moto does not answer, so nothing here asks for it).
- HTTP: ``Repr-Digest`` (RFC 9530): ``sha-256=:base64:`` and ``sha-512=:base64:``.
- The Hugging Face hub: ``X-Linked-Etag`` on a resolve URL's answer (the redirect to
  the CDN) is the sha256 of an LFS file. Other ETags are not taken for one: the hub's
  own for a file kept in git is a git blob id, and a CDN's may be another hash.
- fsspec backends: gcsfs's ``crc32c`` (else ``md5Hash``), base64; the hf://
  filesystem's ``lfs.sha256``.

Values are kept as lower-case hex of the checksum's bytes; anything malformed is no
digest (the object is then checked block by block only, as before digests).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from cachefs.node.layout import Digest
from cachefs.node.origins.ranged_http import Answer

# S3's checksum fields, cheapest to check first (only one is ever set).
_S3_ALGORITHMS = ("CRC64NVME", "CRC32C", "CRC32", "SHA256", "SHA1")
_SIZES = {
    "crc32": 4,
    "crc32c": 4,
    "crc64nvme": 8,
    "md5": 16,
    "sha1": 20,
    "sha256": 32,
    "sha512": 64,
}
# RFC 9530 names -> ours; sha-256 first, the cheaper to check.
_REPR_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512"}
_REPR_MEMBER = re.compile(r"^\s*([a-z0-9_.*-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*(?:;.*)?$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def s3_digest(head: Mapping[str, Any]) -> Digest | None:
    """The digest a HeadObject answer (``ChecksumMode=ENABLED``) states, if any."""
    for name in _S3_ALGORITHMS:
        value = head.get(f"Checksum{name}")
        if not value:
            continue
        algorithm = name.lower()
        encoded, dash, parts = str(value).partition("-")
        if dash or head.get("ChecksumType") == "COMPOSITE":
            raw = _decoded(encoded, None)
            suffix = f"-{parts}" if dash else ""
            return Digest(f"{algorithm}-composite", raw.hex() + suffix) if raw else None
        return _digest(algorithm, encoded)
    return None


def http_digest(answer: Answer) -> Digest | None:
    """The digest an HTTP answer states: ``Repr-Digest``, else the hub's sha256."""
    members = {}
    for member in answer.headers.get("repr-digest", "").split(","):
        match = _REPR_MEMBER.match(member)
        if match and match.group(1).lower() in _REPR_ALGORITHMS:
            members[_REPR_ALGORITHMS[match.group(1).lower()]] = match.group(2)
    for algorithm in _REPR_ALGORITHMS.values():
        if algorithm in members:
            found = _digest(algorithm, members[algorithm])
            if found is not None:
                return found
    for seen in (answer, *answer.redirects):
        linked = seen.headers.get("x-linked-etag", "").strip().removeprefix("W/").strip('"')
        if _SHA256_HEX.match(linked.lower()):
            return Digest("sha256", linked.lower())
    return None


def info_digest(protocol: str, info: Mapping[str, Any]) -> Digest | None:
    """The digest in an fsspec ``info`` entry of a backend known to state one."""
    if protocol in ("gs", "gcs"):
        return _digest("crc32c", info.get("crc32c")) or _digest("md5", info.get("md5Hash"))
    if protocol == "hf":
        lfs = info.get("lfs") or {}
        sha256 = str(lfs.get("sha256") or "").lower() if isinstance(lfs, Mapping) else ""
        return Digest("sha256", sha256) if _SHA256_HEX.match(sha256) else None
    return None


def _digest(algorithm: str, encoded: Any) -> Digest | None:
    raw = _decoded(encoded, _SIZES[algorithm])
    return Digest(algorithm, raw.hex()) if raw else None


def _decoded(encoded: Any, size: int | None) -> bytes | None:
    """Base64 ``encoded`` as bytes (of ``size`` when given); None if it is not that."""
    if not isinstance(encoded, str) or not encoded:
        return None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw and (size is None or len(raw) == size) else None
