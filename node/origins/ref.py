"""What a stat of an origin object yields: its URL, version, size and digest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cachefs.node.layout import Digest
from cachefs.urls import OriginURL, object_id

# Keys under which fsspec backends report a content identity, strongest first.
_VERSION_KEYS = (
    "ETag",
    "etag",
    "generation",
    "VersionId",
    "version_id",
    "md5Hash",
    "content_md5",
    "checksum",
    "sha256",
    "blob_id",
    "lfs_oid",
)
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


@dataclass(frozen=True)
class ObjectRef:
    """One origin object at one version; a reader pins itself to it.

    ``digest``: the origin's own checksum of the whole object, which a complete copy
    must match; None when it publishes none, or when the ref came from another node
    (which does not send it).
    """

    url: OriginURL
    version: str
    size: int
    etag: str | None = None
    digest: Digest | None = None

    @property
    def id(self) -> str:
        return object_id(self.url.canonical, self.version)

    @property
    def canonical(self) -> str:
        return self.url.canonical


def version_from_info(info: dict[str, Any]) -> str:
    """The version string of an fsspec ``info`` entry: a content id, else size + mtime."""
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key.lower()}:{str(value).strip()}"
    for key in _TIME_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            stamp = _timestamp(value)
            return f"size:{info.get('size')}:{key.lower()}:{stamp}"
    return f"size:{info.get('size')}"


def _timestamp(value: Any) -> str:
    """One spelling per instant, whether a backend gives a datetime, a float or text."""
    if hasattr(value, "timestamp"):
        return repr(value.timestamp())
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)
