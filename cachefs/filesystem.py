"""``cachefs::`` as an fsspec filesystem: read any fsspec URL through the cache.

``fsspec.open("cachefs::s3://bucket/model.safetensors")`` chains this filesystem in
front of s3fs: fsspec passes ``target_protocol="s3"``, ``target_options`` and
``fo``. It can also be used alone with full URLs as paths:
``fsspec.filesystem("cachefs").cat_file("s3://bucket/key")``.

It asks the node named by ``endpoint=`` or ``CACHEFS_ENDPOINT`` (client mode);
without one it runs the engine in this process (embedded mode). Every open file is
pinned to the object version seen when it was opened. A complete cached object whose
file this host can see opens as a plain local file, with no bytes through gRPC;
``open_local`` returns its path, so ``safetensors.safe_open`` can mmap it.
"""

from __future__ import annotations

import errno
import os
from typing import Any, ClassVar

from fsspec.implementations.chained import ChainedFileSystem
from fsspec.registry import get_filesystem_class
from fsspec.spec import AbstractBufferedFile

from cachefs import ranges
from cachefs.connect import connect
from cachefs.types import CacheClient, ObjectInfo

PROTOCOL = "cachefs"
_PREFIXES = ("cachefs::", "cachefs://")
_OPTIONS = (
    "endpoint",
    "token",
    "cache_dir",
    "config",
    "timeout",
    "local_reads",
    "target_protocol",
    "target_options",
    "fs",
    "fo",
)
# What fsspec's own filesystem base takes (skip_instance_cache never reaches __init__).
_BASE_OPTIONS = frozenset(
    {"use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop"}
)


class CacheFileSystem(ChainedFileSystem):
    """Read-only filesystem whose reads go through the cachefs cache."""

    protocol: ClassVar[str] = PROTOCOL
    _strip_tokenize_options = ("fo",)
    local_file = True
    root_marker = ""

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fs: Any = None,
        fo: str | None = None,
        endpoint: str | None = None,
        cache_dir: str | None = None,
        config: str | None = None,
        timeout: float | None = None,
        local_reads: bool = True,
        token: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``endpoint`` names a node (else CACHEFS_ENDPOINT; else embedded mode, whose
        cache ``cache_dir`` / ``config`` choose). ``target_options`` are the origin's
        storage options: embedded mode uses them, a node never receives them.
        ``timeout`` bounds each call to a node (seconds); ``local_reads=False`` sends
        every read through the node even when its file is visible here; ``token`` is
        the cluster token a node on TCP asks for (else CACHEFS_TOKEN/_FILE).
        """
        unknown = sorted(set(kwargs) - _BASE_OPTIONS)
        if unknown:
            raise TypeError(
                f"the cachefs filesystem has no option {unknown[0]!r}; its options are "
                f"{', '.join(_OPTIONS)} (and fsspec's {', '.join(sorted(_BASE_OPTIONS))}); "
                "an origin's own options go in target_options, or as "
                "fsspec.open('cachefs::s3://...', s3={...})"
            )
        super().__init__(**kwargs)
        if fs is not None:
            if target_protocol is not None:
                raise ValueError("give either fs or target_protocol, not both")
            protocol = fs.protocol
            target_protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
            target_options = dict(fs.storage_options)
        self.target_protocol = target_protocol
        self.target_options = dict(target_options or {})
        self.endpoint = endpoint
        self.cache_dir = cache_dir
        self.config_path = config
        self.timeout = timeout
        self.local_reads = local_reads
        self.token = token
        self.fo = fo
        self._client: tuple[int, CacheClient] | None = None
        if target_protocol is not None:
            target_class = get_filesystem_class(target_protocol)

            def _strip_protocol(path: Any) -> Any:
                # An instance attribute: each instance chains a different target.
                return target_class._strip_protocol(type(self)._strip_protocol(path))

            self._strip_protocol = _strip_protocol  # type: ignore[method-assign]

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list | tuple):
            return type(path)(cls._strip_protocol(p) for p in path)
        path = str(path)
        for prefix in _PREFIXES:
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path

    @property
    def client(self) -> CacheClient:
        """The node's client, or the embedded engine's: made once per process."""
        if self._client is None or self._client[0] != os.getpid():
            options = {self.target_protocol: self.target_options} if self.target_protocol else None
            client = connect(
                self.endpoint, self.cache_dir, self.config_path, options, self.timeout, self.token
            )
            self._client = (os.getpid(), client)
        return self._client[1]

    def origin_url(self, path: str) -> str:
        """The origin URL that ``path`` names for this filesystem."""
        path = type(self)._strip_protocol(str(path))
        if "://" in path:
            return path
        protocol = self.target_protocol
        if protocol is None and path.startswith("/"):
            protocol = "file"
        if protocol is None:
            raise ValueError(
                f"{path!r} names no origin: use a full URL (s3://bucket/key) or chain "
                "a protocol (cachefs::s3://bucket/key)"
            )
        if protocol == "file":
            return "file://" + ("/" + path.lstrip("/"))
        return f"{protocol}://{path.lstrip('/') if protocol != 'memory' else path}"

    def _name(self, canonical_or_path: str) -> str:
        """What ``info``/``ls`` report as ``name``: no protocol when chained."""
        return (
            self._strip_protocol(canonical_or_path) if self.target_protocol else (canonical_or_path)
        )

    # -- metadata ----------------------------------------------------------------

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self.origin_url(path)
        try:
            info = self.client.stat(url)
        except IsADirectoryError:
            return {"name": self._name(url), "size": 0, "type": "directory"}
        return {
            "name": self._name(url),
            "size": info.size,
            "type": "file",
            "version": info.version,
            "url": info.url,
        }

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        entries = [
            {**entry, "name": self._name(entry["name"])}
            for entry in self.client.ls(self.origin_url(path))
        ]
        return entries if detail else [e["name"] for e in entries]

    def ukey(self, path: str) -> str:
        return self.client.stat(self.origin_url(path)).id

    # -- reads -------------------------------------------------------------------

    def _local_file(self, info: ObjectInfo) -> str | None:
        return self.client.local_path(info) if self.local_reads else None

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        client = self.client
        info = client.stat(self.origin_url(path))
        # fsspec's contract: negative offsets count back from the end, like slices.
        start = max(0, info.size + start) if start is not None and start < 0 else start or 0
        end = info.size + end if end is not None and end < 0 else end
        start, end = ranges.clipped(info.url, info.size, start, end)
        local = self._local_file(info)
        if local is not None:
            try:
                with open(local, "rb") as f:
                    f.seek(start)
                    return f.read(end - start)
            except FileNotFoundError:
                pass  # evicted since the stat: read through the cache
        return client.read(info, start, end)

    def open_local(self, path: str) -> str:
        """Path of the complete, verified cached file (fetched first if needed)."""
        return self.client.open_local(self.origin_url(path))

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if mode != "rb":
            raise PermissionError(
                errno.EROFS, f"cachefs is read-only; cannot open {path} for {mode!r}"
            )
        client = self.client
        info = client.stat(self.origin_url(path))
        local = self._local_file(info)
        if local is not None:
            try:
                return open(local, "rb")
            except FileNotFoundError:
                pass  # evicted since the stat: read through the cache
        return CachedFile(
            self,
            path,
            info,
            block_size=block_size or client.block_size,
            cache_options=cache_options,
        )


class CachedFile(AbstractBufferedFile):
    """A file pinned to one object version; ranges come from the cache client."""

    def __init__(
        self,
        fs: CacheFileSystem,
        path: str,
        info: ObjectInfo,
        block_size: int,
        cache_options: dict[str, Any] | None = None,
    ) -> None:
        self.info = info
        super().__init__(
            fs,
            path,
            mode="rb",
            block_size=block_size,
            cache_type="readahead",
            cache_options=cache_options,
            size=info.size,
        )

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.client.read(self.info, start, end)
