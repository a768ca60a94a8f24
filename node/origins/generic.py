"""Any fsspec filesystem as an origin (file://, memory://, gs://, az://, hf://, ...).

Backends without a way to make a ranged read conditional are pinned by a second
look: after each read the object's version is checked again, and a change fails the
read instead of serving a mix of two versions.
"""

from __future__ import annotations

import errno
from typing import Any

import fsspec

from cachefs.errors import TransientOriginError, VersionChangedError
from cachefs.node.origins.digests import info_digest
from cachefs.node.origins.ref import ObjectRef, version_from_info
from cachefs.node.sinks import Sink
from cachefs.urls import OriginURL

# errno values backends (s3fs's error table among them) use for answers worth retrying.
TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET})


class FsspecBackend:
    def __init__(self, protocol: str, options: dict[str, Any]) -> None:
        self.protocol = protocol
        self.fs = fsspec.filesystem(protocol, **options)

    def _info(self, url: OriginURL) -> dict[str, Any]:
        self.fs.invalidate_cache(url.path)  # a listing cached by find/ls may be stale
        try:
            return self.fs.info(url.path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                errno.ENOENT, f"no such object at the origin: {url}; check the URL"
            ) from exc
        except PermissionError as exc:
            raise PermissionError(
                errno.EACCES,
                f"the origin denied access to {url}; check the credentials and "
                "permissions configured for this origin",
            ) from exc
        except OSError as exc:
            raise _with_url(exc, url) from exc

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
        return [
            self._ref(url.child(path), info)
            for path, info in sorted(found.items())
            if info.get("type", "file") == "file"
        ]

    def ls(self, url: OriginURL) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(url.path)
        return self.fs.ls(url.path, detail=True)

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


def _with_url(exc: OSError, url: OriginURL) -> OSError:
    """A backend's bare error ("Service Unavailable") as one that names the URL;
    transient kinds become TransientOriginError, which the origin layer retries."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in TRANSIENT_ERRNOS or isinstance(exc, ConnectionError | TimeoutError):
        return TransientOriginError(f"{url}: origin answered {reason}")
    return OSError(exc.errno or errno.EIO, f"{url}: origin answered {reason}")
