"""``cachefs::`` as an fsspec filesystem: read any fsspec URL through the cache.

``fsspec.open("cachefs::s3://bucket/model.safetensors")`` chains this filesystem in
front of s3fs: fsspec passes ``target_protocol="s3"``, ``target_options`` and
``fo``. It can also be used alone with full URLs as paths:
``fsspec.filesystem("cachefs").cat_file("s3://bucket/key")``.

Every open file is pinned to the object version seen when it was opened. A complete
cached object opens as a plain local file; ``open_local`` returns its path, so
``safetensors.safe_open`` can mmap it.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from fsspec.implementations.chained import ChainedFileSystem
from fsspec.registry import get_filesystem_class
from fsspec.spec import AbstractBufferedFile

PROTOCOL = "cachefs"
_PREFIXES = ("cachefs::", "cachefs://")


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
        cache_dir: str | None = None,
        config: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``cache_dir`` / ``config`` choose the cache (else CACHEFS_CACHE_DIR /
        CACHEFS_CONFIG, else the user's cache directory). ``target_options`` are the
        origin's storage options, used in embedded mode only.
        """
        super().__init__(**kwargs)
        if fs is not None:
            if target_protocol is not None:
                raise ValueError("give either fs or target_protocol, not both")
            protocol = fs.protocol
            target_protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
            target_options = dict(fs.storage_options)
        self.target_protocol = target_protocol
        self.target_options = dict(target_options or {})
        self.cache_dir = cache_dir
        self.config_path = config
        self.fo = fo
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
    def engine(self) -> Any:
        from cachefs.embedded import get_engine

        options = {self.target_protocol: self.target_options} if self.target_protocol else None
        return get_engine(self.cache_dir, self.config_path, options)

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
            ref = self.engine.stat(url)
        except IsADirectoryError:
            return {"name": self._name(url), "size": 0, "type": "directory"}
        return {
            "name": self._name(url),
            "size": ref.size,
            "type": "file",
            "version": ref.version,
            "url": ref.canonical,
        }

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        from node.urls import parse_url

        url = parse_url(self.origin_url(path))
        entries = []
        for entry in self.engine.origin.ls(url):
            name = entry["name"]
            full = name if "://" in name else url.child(name).canonical
            entries.append({**entry, "name": self._name(full)})
        return entries if detail else [e["name"] for e in entries]

    def ukey(self, path: str) -> str:
        return self.engine.stat(self.origin_url(path)).id

    # -- reads -------------------------------------------------------------------

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        ref = self.engine.stat(self.origin_url(path))
        # fsspec's contract: negative offsets count back from the end, like slices.
        start = max(0, ref.size + start) if start is not None and start < 0 else start or 0
        end = ref.size + end if end is not None and end < 0 else end
        return self.engine.read_ref(ref, start, end)

    def open_local(self, path: str) -> str:
        """Path of the complete, verified cached file (fetched first if needed)."""
        return str(self.engine.open_local(self.origin_url(path)))

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
        engine = self.engine
        ref = engine.stat(self.origin_url(path))
        cached = engine.store.get(ref.id)
        if cached is not None and cached.complete:
            local = engine.store.local_path(cached)
            if local is not None:
                return open(local, "rb")
        return CachedFile(
            self,
            path,
            ref,
            block_size=block_size or engine.config.block_size,
            cache_options=cache_options,
        )


class CachedFile(AbstractBufferedFile):
    """A file pinned to one object version; ranges come from the engine."""

    def __init__(
        self,
        fs: CacheFileSystem,
        path: str,
        ref: Any,
        block_size: int,
        cache_options: dict[str, Any] | None = None,
    ) -> None:
        self.ref = ref
        super().__init__(
            fs,
            path,
            mode="rb",
            block_size=block_size,
            cache_type="readahead",
            cache_options=cache_options,
            size=ref.size,
        )

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.engine.read_ref(self.ref, start, end)
