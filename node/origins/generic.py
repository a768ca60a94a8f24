"""Any fsspec filesystem as an origin (file://, memory://, gs://, az://, hf://, ...).

Backends without a way to make a ranged read conditional are pinned by a second
look: after each read the object's version is checked again, and a change fails the
read instead of serving a mix of two versions.
"""

from __future__ import annotations

import errno
from typing import Any

import fsspec

from cachefs.errors import VersionChangedError
from cachefs.node.origins.digests import info_digest
from cachefs.node.origins.errors import origin_error
from cachefs.node.origins.ref import ObjectRef, version_from_info
from cachefs.node.sinks import Sink
from cachefs.urls import OriginURL


class FsspecBackend:
    def __init__(self, protocol: str, options: dict[str, Any]) -> None:
        self.protocol = protocol
        self.fs = fsspec.filesystem(protocol, **options)

    def _info(self, url: OriginURL) -> dict[str, Any]:
        self.fs.invalidate_cache(url.path)  # a listing cached by find/ls may be stale
        try:
            return self.fs.info(url.path)
        except OSError as exc:
            raise origin_error(exc, url.canonical) from exc

    def _ref(self, url: OriginURL, info: dict[str, Any]) -> ObjectRef:
        return ObjectRef(
            url=url,
            version=version_from_info(info),
            size=int(info["size"] or 0),
            digest=info_digest(self.protocol, info),
        )

    def stat(self, url: OriginURL) -> ObjectRef:
        info = self._info(url)
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, f"{url} is a directory; name an object in it")
        return self._ref(url, info)

    def list(self, url: OriginURL) -> list[ObjectRef]:
        try:
            found = self.fs.find(url.path, detail=True)
        except FileNotFoundError:  # e.g. no such bucket: nothing under this URL
            return []
        except OSError as exc:  # named, and retried when transient, as a stat's errors
            raise origin_error(exc, url.canonical) from exc
        return [
            self._ref(url.child(path), info)
            for path, info in sorted(found.items())
            if info.get("type", "file") == "file"
        ]

    def ls(self, url: OriginURL) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(url.path)
        try:
            return self.fs.ls(url.path, detail=True)
        except OSError as exc:
            raise origin_error(exc, url.canonical) from exc

    def read(self, ref: ObjectRef, start: int, end: int, sink: Sink) -> None:
        data = self.fs.cat_file(ref.url.path, start=start, end=end)
        if len(data) != end - start:
            self._check_version(ref)
            raise OSError(
                errno.EIO, f"{ref.url}: the origin returned {len(data)} of {end - start} bytes"
            )
        sink.write(memoryview(data))
        self._check_version(ref)

    def _check_version(self, ref: ObjectRef) -> None:
        try:
            current = version_from_info(self._info(ref.url))
        except FileNotFoundError as exc:
            raise VersionChangedError(ref.canonical, ref.version, "deleted at the origin") from exc
        if current != ref.version:
            raise VersionChangedError(ref.canonical, ref.version, f"now {current}")
