"""cachefs as an fsspec filesystem: chained URLs, metadata, reads, local paths, pickling.

``cachefs::PROTOCOL://...`` works for S3, HTTP, file:// and memory:// origins through
fsspec's own entry points (``fsspec.open``, ``url_to_fs``, ``filesystem``); errors
arrive as builtins; a complete object opens as a plain local file.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from servers import RangeHTTPServer, S3Bucket

from cachefs.errors import VersionChangedError

DATA = random.Random(2024).randbytes(3 * 1024 * 1024 // 2 + 77)  # 1.5 MiB and a ragged tail


def test_entry_point_needs_no_import() -> None:
    """fsspec finds the cachefs protocol through the package's entry point, before
    anything imports cachefs."""
    code = (
        "import sys, fsspec\n"
        "assert not any(m == 'cachefs' or m.startswith('cachefs.') for m in sys.modules)\n"
        "cls = fsspec.get_filesystem_class('cachefs')\n"
        "print(cls.__module__, cls.__name__, cls.protocol)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cachefs.filesystem", "CacheFileSystem", "cachefs"]


# --------------------------------------------------------------- origins


class Chained:
    """One origin kind behind ``cachefs::``: how to put objects and name them."""

    def __init__(
        self, kind: str, put: Callable[[str, bytes], str], missing: str, name: Callable[[str], str]
    ) -> None:
        self.kind = kind
        self._put = put
        self.missing = missing  # a URL that names no object
        self.name = name  # what info()/ls() report as the name of a URL

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key``; return the origin URL."""
        return self._put(key, data)


@pytest.fixture(params=["s3", "http", "file", "memory"])
def chained(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chained]:
    kind = request.param
    if kind == "s3":
        s3: S3Bucket = request.getfixturevalue("s3")

        def put_s3(key: str, data: bytes) -> str:
            s3.put(key, data)
            return s3.url(key)

        yield Chained(kind, put_s3, s3.url("no/such.bin"), lambda url: url.removeprefix("s3://"))
    elif kind == "http":
        http: RangeHTTPServer = request.getfixturevalue("http_origin")

        def put_http(key: str, data: bytes) -> str:
            http.put("/" + key, data)
            return http.url("/" + key)

        yield Chained(kind, put_http, http.url("/no/such.bin"), lambda url: url)
    elif kind == "file":
        root = tmp_path / "origin"

        def put_file(key: str, data: bytes) -> str:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return f"file://{path}"

        yield Chained(
            kind, put_file, f"file://{root}/no/such.bin", lambda url: url.removeprefix("file://")
        )
    else:
        memfs = fsspec.filesystem("memory")
        root = f"/cachefs-fs-{uuid.uuid4().hex[:12]}"

        def put_memory(key: str, data: bytes) -> str:
            memfs.pipe_file(f"{root}/{key}", data)
            return f"memory://{root}/{key}"

        yield Chained(
            kind,
            put_memory,
            f"memory://{root}/no/such.bin",
            lambda url: url.removeprefix("memory://"),
        )
        if memfs.exists(root):
            memfs.rm(root, recursive=True)


# ------------------------------------------------------------------ tests


def test_fsspec_open_chained(chained: Chained, cache_dir: Path) -> None:
    """fsspec.open("cachefs::URL") reads the origin's bytes, with seeks, for every kind."""
    url = chained.put("weights/model.bin", DATA)
    with fsspec.open(f"cachefs::{url}", "rb", cache_dir=str(cache_dir)) as f:
        assert f.read(10) == DATA[:10]
        f.seek(1_000_000)
        assert f.tell() == 1_000_000
        assert f.read(70_000) == DATA[1_000_000:1_070_000]
        f.seek(-5, io.SEEK_END)
        assert f.read() == DATA[-5:]
        f.seek(0)
        assert f.read() == DATA


def test_info_cat_and_open_local(chained: Chained, cache_dir: Path) -> None:
    """info names the object without the cachefs protocol, cat_file serves ranges, and
    open_local gives a path whose bytes are the origin's; then open() of the complete
    object is a real local file."""
    url = chained.put("weights/model.bin", DATA)
    fs, path = fsspec.url_to_fs(f"cachefs::{url}", cache_dir=str(cache_dir))
    info = fs.info(path)
    assert info["name"] == chained.name(url)
    assert info["size"] == len(DATA)
    assert info["type"] == "file"
    assert fs.size(path) == len(DATA)
    assert fs.isfile(path)

    rng = random.Random(7)
    for _ in range(20):
        start = rng.randrange(len(DATA))
        end = rng.randrange(start, len(DATA) + 1)
        assert fs.cat_file(path, start, end) == DATA[start:end]
    assert fs.cat_file(path) == DATA
    assert fs.cat_file(path, -100) == DATA[-100:]
    assert fs.cat_file(path, 10, len(DATA) + 50) == DATA[10:]

    with fs.open(path, "rb") as f:  # not yet complete: served through the cache
        f.seek(123_456)
        assert f.read(1000) == DATA[123_456:124_456]

    local = fs.open_local(path)
    assert isinstance(local, str)
    assert Path(local).read_bytes() == DATA
    with fs.open(path, "rb") as f:
        assert isinstance(f, io.BufferedReader), f"complete object opened as {type(f)}"
        assert Path(f.name).samefile(local)
        f.seek(len(DATA) - 3)
        assert f.read() == DATA[-3:]


def test_missing_object_is_file_not_found(chained: Chained, cache_dir: Path) -> None:
    """A missing object raises FileNotFoundError from every read entry point."""
    chained.put("present.bin", b"x")
    fs, path = fsspec.url_to_fs(f"cachefs::{chained.missing}", cache_dir=str(cache_dir))
    with pytest.raises(FileNotFoundError):
        fs.info(path)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(path)
    with pytest.raises(FileNotFoundError):
        fs.open(path, "rb")
    with pytest.raises(FileNotFoundError):
        fs.open_local(path)
    with (
        pytest.raises(FileNotFoundError),
        fsspec.open(f"cachefs::{chained.missing}", "rb", cache_dir=str(cache_dir)) as f,
    ):
        f.read()
    assert not fs.exists(path)


def test_read_only(chained: Chained, cache_dir: Path) -> None:
    """Opening for writing fails with PermissionError (read-only filesystem) and the
    origin object is untouched."""
    url = chained.put("ro.bin", DATA[:1000])
    fs, path = fsspec.url_to_fs(f"cachefs::{url}", cache_dir=str(cache_dir))
    for mode in ("wb", "ab", "w"):
        with pytest.raises(PermissionError):
            fs.open(path, mode)
    with pytest.raises(PermissionError):
        fs.pipe_file(path, b"new bytes")
    with (
        pytest.raises(PermissionError),
        fsspec.open(f"cachefs::{url}", "wb", cache_dir=str(cache_dir)) as f,
    ):
        f.write(b"new bytes")
    assert fs.cat_file(path) == DATA[:1000]


def test_pickled_filesystem_still_reads(chained: Chained, cache_dir: Path) -> None:
    """The filesystem and an OpenFile survive pickling (as for DataLoader workers) and
    read the same bytes afterwards."""
    url = chained.put("pickle/model.bin", DATA)
    fs, path = fsspec.url_to_fs(f"cachefs::{url}", cache_dir=str(cache_dir))
    assert fs.cat_file(path, 0, 100) == DATA[:100]
    blob = pickle.dumps(fs)
    type(fs).clear_instance_cache()  # unpickling must rebuild it, not find it
    clone = pickle.loads(blob)
    assert clone is not fs
    assert clone.cat_file(path, 5, 50_000) == DATA[5:50_000]
    assert clone.info(path)["size"] == len(DATA)

    opener = fsspec.open(f"cachefs::{url}", "rb", cache_dir=str(cache_dir))
    with pickle.loads(pickle.dumps(opener)) as f:
        assert f.read() == DATA


def test_ls_prefix_s3(s3: S3Bucket, cache_dir: Path) -> None:
    """ls of an S3 prefix lists files (with sizes) and sub-directories, named without
    the protocol when chained and with full URLs when unchained."""
    s3.put("model/config.json", b"{}")
    s3.put("model/weights.bin", DATA[:5000])
    s3.put("model/tokenizer/vocab.txt", b"a\nb\n")
    s3.put("other/file.bin", b"elsewhere")
    fs, path = fsspec.url_to_fs(f"cachefs::{s3.url('model')}", cache_dir=str(cache_dir))
    entries = {e["name"]: e for e in fs.ls(path, detail=True)}
    base = f"{s3.name}/model"
    assert set(entries) == {f"{base}/config.json", f"{base}/weights.bin", f"{base}/tokenizer"}
    assert entries[f"{base}/weights.bin"]["size"] == 5000
    assert entries[f"{base}/weights.bin"]["type"] == "file"
    assert entries[f"{base}/tokenizer"]["type"] == "directory"
    assert sorted(fs.ls(path, detail=False)) == sorted(entries)
    assert fs.info(f"{base}/tokenizer")["type"] == "directory"
    assert fs.isdir(f"{base}/tokenizer")

    plain = fsspec.filesystem("cachefs", cache_dir=str(cache_dir))
    names = sorted(plain.ls(s3.url("model/"), detail=False))
    assert names == sorted(f"s3://{name}" for name in entries)
    assert plain.cat_file(s3.url("model/weights.bin"), 10, 20) == DATA[10:20]
    assert plain.info(s3.url("model/weights.bin"))["name"] == s3.url("model/weights.bin")


def test_ls_prefix_file_and_memory(tmp_path: Path, cache_dir: Path) -> None:
    """ls works on file:// and memory:// directories too."""
    root = tmp_path / "origin" / "model"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 10)
    (root / "sub" / "b.bin").write_bytes(b"b")
    fs, path = fsspec.url_to_fs(f"cachefs::file://{root}", cache_dir=str(cache_dir))
    listed = {e["name"]: e for e in fs.ls(path)}
    assert set(listed) == {f"{root}/a.bin", f"{root}/sub"}
    assert listed[f"{root}/a.bin"]["size"] == 10

    memfs = fsspec.filesystem("memory")
    mem_root = f"/cachefs-ls-{uuid.uuid4().hex[:8]}"
    try:
        memfs.pipe_file(f"{mem_root}/m/x.bin", b"xyz")
        memfs.pipe_file(f"{mem_root}/m/d/y.bin", b"y")
        fs, path = fsspec.url_to_fs(f"cachefs::memory://{mem_root}/m", cache_dir=str(cache_dir))
        names = sorted(fs.ls(path, detail=False))
        assert names == [f"{mem_root}/m/d", f"{mem_root}/m/x.bin"]
        assert fs.cat_file(f"{mem_root}/m/x.bin") == b"xyz"
    finally:
        memfs.rm(mem_root, recursive=True)


def test_filesystem_with_target_protocol(s3: S3Bucket, cache_dir: Path) -> None:
    """fsspec.filesystem("cachefs", target_protocol="s3") takes bucket/key paths."""
    s3.put("direct/obj.bin", DATA[:4096])
    fs = fsspec.filesystem("cachefs", target_protocol="s3", cache_dir=str(cache_dir))
    path = f"{s3.name}/direct/obj.bin"
    assert fs.info(path)["name"] == path
    assert fs.cat_file(path) == DATA[:4096]
    assert fs.cat_file(f"cachefs::s3://{path}", 1, 3) == DATA[1:3]
    with fs.open(path) as f:
        assert f.read() == DATA[:4096]
    assert fs.ukey(path) == fs.ukey(path)


def test_open_pins_version_seen_at_open(s3: S3Bucket, cache_dir: Path) -> None:
    """A chained open pins the version it saw: an overwrite mid-read gives old bytes or
    VersionChangedError (an OSError), never the new bytes."""
    old, new = DATA, bytes(reversed(DATA))
    s3.put("pinned.bin", old)
    fs, path = fsspec.url_to_fs(f"cachefs::{s3.url('pinned.bin')}", cache_dir=str(cache_dir))
    with fs.open(path, "rb", block_size=64 * 1024) as f:
        assert f.read(100) == old[:100]
        s3.put("pinned.bin", new)
        f.seek(len(DATA) - 1000)
        try:
            tail: Any = f.read()
        except VersionChangedError as exc:
            assert isinstance(exc, OSError)
            tail = None
        assert tail in (None, old[-1000:])


# ------------------------------------------------------------- safetensors


def test_safetensors_from_s3(s3: S3Bucket, cache_dir: Path) -> None:
    """A safetensors file in S3 opens with safetensors.safe_open on open_local's path
    and its tensors equal the ones saved."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.numpy import save

    rng = np.random.default_rng(5)
    tensors = {
        "embed.weight": rng.standard_normal((128, 64)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(64).astype(np.float16),
        "layer.0.ids": rng.integers(0, 1000, size=(7, 3), dtype=np.int64),
    }
    s3.put("model/model.safetensors", save(tensors, metadata={"format": "np"}))
    url = f"cachefs::{s3.url('model/model.safetensors')}"
    fs, path = fsspec.url_to_fs(url, cache_dir=str(cache_dir))
    with safe_open(fs.open_local(path), "np") as loaded:
        assert sorted(loaded.keys()) == sorted(tensors)
        assert loaded.metadata() == {"format": "np"}
        for name, expected in tensors.items():
            got = loaded.get_tensor(name)
            assert got.dtype == expected.dtype
            assert np.array_equal(got, expected), name
