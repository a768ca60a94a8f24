"""Where a model's bytes come from: local files, or objects read through the cache.

A source is a local path (a ``.safetensors`` file, an index file, or a directory of
shards) or a URL (``cachefs::s3://bucket/model/``, or a plain ``s3://...``: every URL
is read through the cache). A directory or prefix loads the shards its
``model.safetensors.index.json`` names, else every ``*.safetensors`` in it.

A ``Shard`` reads byte ranges into buffers the caller owns. A local file is read with
``preadv``. A cached object is read from its verified data file once it is complete
and visible on this host, and through the cache client (``readinto``) before that,
while a background prefetch fills it ahead of the reads. The loader starts that
prefetch (``Resolved.start_prefetch``) once it has asked for every shard's header,
so the headers are fetched first and do not wait behind the tensor blocks. Nothing
here imports the gRPC client or the engine unless a URL is given.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachefs.loaders.errors import MissingShardError, SafetensorsFormatError

if TYPE_CHECKING:
    from cachefs.types import CacheClient, ObjectInfo

log = logging.getLogger("cachefs.loaders")

INDEX_NAME = "model.safetensors.index.json"
MAX_THREADS = 16  # shards stat'ed, or their headers read, at once
_URL_PREFIXES = ("cachefs::", "cachefs://")
try:
    _IOV_MAX = max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
except (ValueError, OSError, AttributeError):  # pragma: no cover - not on Linux
    _IOV_MAX = 16


def is_url(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names an object through the cache rather than a local path."""
    text = os.fspath(source)
    return text.startswith(_URL_PREFIXES) or "://" in text


def origin_url(source: str) -> str:
    """``source`` without a leading ``cachefs::``: the origin URL it reads."""
    for prefix in _URL_PREFIXES:
        if source.startswith(prefix):
            return source[len(prefix) :]
    return source


class Shard:
    """One safetensors file: a name for messages, a size, and ranged reads."""

    name: str
    size: int

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) (fewer only at the end of the file)."""
        raise NotImplementedError

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` (consecutive in the file) with the bytes from ``offset``."""
        raise NotImplementedError

    def local_fd(self) -> int | None:
        """A descriptor of the complete local file, if the shard reads one now."""
        return None

    def close(self) -> None:
        pass


def preadv_full(fd: int, views: Sequence[memoryview], offset: int, name: str) -> None:
    """``preadv`` until every view is full; a short file is an error naming ``name``."""
    pending = [v for v in views if len(v)]
    while pending:
        batch = pending[:_IOV_MAX]
        got = os.preadv(fd, batch, offset)
        if got == 0:
            raise SafetensorsFormatError(
                name,
                f"the file ended at byte {offset} while reading tensor data (it was cut "
                "short after its header was read)",
            )
        offset += got
        while got and pending:
            first = pending[0]
            if got >= len(first):
                got -= len(first)
                pending.pop(0)
            else:
                pending[0] = first[got:]
                got = 0


class LocalShard(Shard):
    """A file on a local file system."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self._fd).st_size
        self.local_reads = 0

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self._fd, max(0, end - start), start)

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        self.local_reads += 1
        preadv_full(self._fd, views, offset, self.name)

    def local_fd(self) -> int | None:
        return self._fd if self._fd >= 0 else None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class CachedShard(Shard):
    """An object read through the cache, pinned to the version seen when resolved.

    Reads go to the object's verified data file once the cache has all of it and this
    host can see the file (``switch_to_local``); before that through the client, which
    waits for the blocks the prefetch is filling, or fills them itself. With
    ``allow_local=False`` (the filesystem's ``local_reads=False``) every read goes
    through the client.
    """

    def __init__(
        self, client: CacheClient, url: str, info: ObjectInfo, allow_local: bool = True
    ) -> None:
        self.client = client
        self.allow_local = allow_local
        self.url = url
        self.info = info
        self.name = info.url
        self.size = info.size
        self._fd = -1
        self._lock = threading.Lock()
        self.local_reads = 0  # reads served from the data file, and through the client
        self.client_reads = 0
        path = client.local_path(info) if info.complete and allow_local else None
        if path is not None:
            self._open(path)

    @property
    def local(self) -> bool:
        return self._fd >= 0

    def local_fd(self) -> int | None:
        return self._fd if self._fd >= 0 else None

    def _open(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return  # evicted or replaced since: keep reading through the client
        if os.fstat(fd).st_size != self.size:
            os.close(fd)
            return
        with self._lock:
            if self._fd < 0:
                self._fd = fd
                return
        os.close(fd)

    def switch_to_local(self) -> bool:
        """Read from the data file from now on, if the object is complete and visible."""
        if self.local:
            return True
        if not self.allow_local:
            return False
        try:
            current = self.client.stat(self.url)
        except OSError:
            return False
        if current.id != self.info.id:
            return False  # the origin has a new version: stay on the pinned one
        path = self.client.local_path(current)
        if path is not None:
            self._open(path)
        return self.local

    def read(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if end <= start:
            return b""
        if self.local:
            return os.pread(self._fd, end - start, start)
        return self.client.read(self.info, start, end)

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        fd = self._fd
        if fd >= 0:
            self.local_reads += 1
            preadv_full(fd, views, offset, self.name)
            return
        self.client_reads += 1
        for view in views:
            if len(view):
                self.client.readinto(self.info, offset, view)
                offset += len(view)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


@dataclass
class Resolved:
    """A source as shards, and what the index (if any) says they hold."""

    shards: list[Shard]
    index: str | None = None  # the index file's path or URL
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor -> shard's name
    client: CacheClient | None = None  # the cache's, for a URL
    prefetch: Prefetch | None = None

    def start_prefetch(self) -> None:
        """Fill the shards the cache does not hold completely, in the background."""
        cold = [s for s in self.shards if isinstance(s, CachedShard) and not s.local]
        if self.client is not None and cold and self.prefetch is None:
            self.prefetch = Prefetch(self.client, cold).start()

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


class Prefetch:
    """A background prefetch of the objects being loaded, so blocks arrive before
    the reads ask for them; once it ends the shards read their data files."""

    def __init__(self, client: CacheClient, shards: Sequence[CachedShard]) -> None:
        self.client = client
        self.shards = list(shards)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cachefs-loader-prefetch")
        self._thread.daemon = True

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.client.prefetch([s.url for s in self.shards])
        except BaseException as exc:  # the reads go on through the client and report
            self.error = exc
            log.debug("background prefetch failed: %s", exc)
        else:
            for shard in self.shards:
                shard.switch_to_local()
        finally:
            self.done.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


# -- resolving a source ------------------------------------------------------------


def resolve(
    source: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> Resolved:
    """The shards ``source`` names, opened (their background prefetch not started)."""
    if is_url(source):
        return _resolve_url(origin_url(os.fspath(source)), storage_options, filesystem)
    if storage_options or filesystem is not None:
        raise ValueError(
            f"{os.fspath(source)!r} is a local path: storage_options and filesystem apply "
            "to URLs only"
        )
    return _resolve_local(Path(source))


def _resolve_local(path: Path) -> Resolved:
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            return _local_index(index)
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if not files:
            raise FileNotFoundError(
                errno.ENOENT, f"{path} holds no *.safetensors files and no {INDEX_NAME}"
            )
        return Resolved(_open_all(LocalShard, files))
    if path.name.endswith(".index.json"):
        return _local_index(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"{path}: no such file or directory")
    return Resolved([LocalShard(path)])


def _local_index(index: Path) -> Resolved:
    weight_map = parse_index(str(index), index.read_bytes())
    shards = []
    for name, tensor in _shard_names(weight_map):
        path = index.parent / name
        if not path.is_file():
            raise MissingShardError(str(index), name, tensor, f"file {path}")
        shards.append(path)
    opened = _open_all(LocalShard, shards)
    by_file = {name: opened[i].name for i, (name, _) in enumerate(_shard_names(weight_map))}
    return Resolved(opened, str(index), {t: by_file[s] for t, s in weight_map.items()})


def _open_all(
    opener: Callable[[Any], Shard], items: Sequence[Any], threads: int = 1
) -> list[Shard]:
    """Every item opened, in order; ``threads`` at once (a stat at the origin each,
    for cached objects); on any failure the opened ones are closed again."""
    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(min(threads, len(items)), "cachefs-loader-open") as pool:
            futures = [pool.submit(opener, item) for item in items]
        opened = [f.result() for f in futures if f.exception() is None]
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is not None:
            for shard in opened:
                shard.close()
            raise failed
        return opened
    opened = []
    try:
        for item in items:
            opened.append(opener(item))
    except BaseException:
        for shard in opened:
            shard.close()
        raise
    return opened


def parse_index(name: str, raw: bytes) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> shard file name."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsFormatError(name, f"not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SafetensorsFormatError(
            name, "has no weight_map object of tensor names to shard file names"
        )
    for tensor, shard in weight_map.items():
        parts = shard.split("/")
        if shard.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise SafetensorsFormatError(
                name, f"names the shard {shard!r}, which is not a path inside its directory", tensor
            )
    return weight_map


def _shard_names(weight_map: dict[str, str]) -> list[tuple[str, str]]:
    """(shard file name, the first tensor the index puts in it), sorted by name."""
    first: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        first.setdefault(shard, tensor)
    return sorted(first.items())


def _filesystem(storage_options: dict[str, Any] | None, filesystem: Any) -> Any:
    if filesystem is not None:
        if storage_options:
            raise ValueError("give either storage_options or filesystem, not both")
        return filesystem
    import fsspec

    return fsspec.filesystem("cachefs", **(storage_options or {}))


def client_of(storage_options: dict[str, Any] | None, filesystem: Any) -> CacheClient:
    """The cache client of the ``cachefs`` filesystem these options make."""
    return _filesystem(storage_options, filesystem).client


def _resolve_url(url: str, storage_options: dict[str, Any] | None, filesystem: Any) -> Resolved:
    fs = _filesystem(storage_options, filesystem)
    client: CacheClient = fs.client
    allow_local = bool(getattr(fs, "local_reads", True))

    def open_url(shard_url: str) -> Shard:
        return CachedShard(client, shard_url, client.stat(shard_url), allow_local)

    given = url
    if url.endswith(".index.json"):
        try:
            index = client.stat(url)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{url}: no such object") from None
        return _url_index(client, url, index, allow_local)
    if not url.endswith("/"):
        try:
            info = client.stat(url)
        except (IsADirectoryError, FileNotFoundError):
            url += "/"  # maybe a prefix without its slash
        else:
            return Resolved([CachedShard(client, url, info, allow_local)], client=client)
    try:  # most models have an index: then the prefix need not be listed
        index = client.stat(url + INDEX_NAME)
    except (FileNotFoundError, IsADirectoryError):
        pass
    else:
        return _url_index(client, url + INDEX_NAME, index, allow_local)
    try:
        listing = client.ls(url)
    except FileNotFoundError:
        listing = []
    names = [e["name"] for e in listing if e.get("type", "file") == "file"]
    shard_urls = sorted(n for n in names if n.endswith(".safetensors"))
    if not shard_urls:
        message = f"{url} holds no *.safetensors objects and no {INDEX_NAME}"
        if not listing:
            message = f"{given}: no such object or prefix"
        raise FileNotFoundError(errno.ENOENT, message)
    return Resolved(_open_all(open_url, shard_urls, MAX_THREADS), client=client)


def _url_index(client: CacheClient, url: str, info: ObjectInfo, allow_local: bool) -> Resolved:
    """The shards an index object names, stat'ed at once (a round trip each when cold)."""
    weight_map = parse_index(info.url, client.read(info, 0, info.size))
    base = url.rsplit("/", 1)[0] + "/"
    shards_and_firsts = _shard_names(weight_map)

    def open_shard(item: tuple[str, str]) -> Shard:
        name, tensor = item
        shard_url = base + name
        try:
            shard_info = client.stat(shard_url)
        except (FileNotFoundError, IsADirectoryError):
            raise MissingShardError(info.url, name, tensor, f"object {shard_url}") from None
        return CachedShard(client, shard_url, shard_info, allow_local)

    shards = _open_all(open_shard, shards_and_firsts, MAX_THREADS)
    by_file = {name: shards[i].name for i, (name, _) in enumerate(shards_and_firsts)}
    weights = {t: by_file[s] for t, s in weight_map.items()}
    return Resolved(shards, info.url, weights, client=client)
