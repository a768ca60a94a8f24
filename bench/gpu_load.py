"""Time to weights in GPU memory: the cachefs loader against safetensors, on one GPU.

    python bench/gpu_load.py [--size 4GiB] [--runs 3] [--device cuda:0|cpu] [--work DIR]
                             [--threads N] [--chunk-size 32MiB] [--pool-size 256MiB]
                             [--json FILE] [--no-sweep]

Builds a bf16 safetensors model of ``--size`` bytes (shaped like a small Llama), puts
it in two cachefs caches (a memory tier on tmpfs, a disk tier) through a ``file://``
origin, and measures the time until every tensor is in GPU memory
(``torch.cuda.synchronize()`` included) for:

* the raw pinned host-to-device bandwidth (one pinned buffer copied to the device),
* the cachefs loader from the memory tier (with its defaults, then a few other
  thread / chunk / pool settings), and from the disk tier (page cache dropped
  first when the script may, i.e. as root, and warm),
* ``safetensors.torch.load_file(path, device="cuda")``,
* ``load_file(path)`` on the CPU, then ``.to("cuda")`` per tensor,

the last two reading the memory tier's data file. Every load is checked against the
file afterwards. Targets for warm data: at least 15 GB/s, and 3x ``load_file``.

Without CUDA (or with ``--device cpu``) it runs a correctness pass on the CPU: the
same caches and loaders, the cachefs loader through its staging pool (the GPU
pipeline with host copies), a smaller model by default, and no GPU figures.
Needs torch and the repository on ``PYTHONPATH``; the caches also need fsspec,
xxhash, pyyaml and platformdirs (without them the model is loaded from plain files
on tmpfs and disk, and the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cachefs.loaders import BufferPool, load_safetensors  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000
TARGET_GBPS = 15.0
TARGET_VS_LOAD_FILE = 3.0


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 256MiB)")
    unit = (match.group(2) or "B").lower()
    factor = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6}
    return int(float(match.group(1)) * factor.get(unit, 10**9))


def model_layout(size: int) -> list[tuple[str, tuple[int, ...]]]:
    """bf16 tensors of a Llama-like model: as many layers as fit in ``size`` bytes."""
    vocab = max(256, min(VOCAB, size // (8 * HIDDEN * 2)))
    layer = [
        ("input_layernorm.weight", (HIDDEN,)),
        ("self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        ("self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
        ("self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
        ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        ("post_attention_layernorm.weight", (HIDDEN,)),
        ("mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        ("mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        ("mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
    ]

    def nbytes(shapes: list[tuple[int, ...]]) -> int:
        total = 0
        for shape in shapes:
            count = 1
            for d in shape:
                count *= d
            total += 2 * count
        return total

    tensors = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    tail = [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab, HIDDEN))]
    per_layer = nbytes([s for _, s in layer])
    used = nbytes([s for _, s in tensors + tail])
    for i in range(max(0, (size - used) // per_layer)):
        tensors += [(f"model.layers.{i}.{name}", shape) for name, shape in layer]
    return tensors + tail


def write_model(path: Path, size: int) -> None:
    """A random bf16 safetensors file of about ``size`` bytes (kept when it exists)."""
    stamp = path.with_name(path.name + ".size")
    if path.exists() and stamp.exists() and stamp.read_text() == str(size):
        return
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    layout = model_layout(size)
    for name, shape in layout:
        count = 1
        for d in shape:
            count *= d
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + 2 * count],
        }
        offset += 2 * count
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = os.urandom(64 * MiB)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, _) in enumerate(layout):
            begin, end = header[name]["data_offsets"]
            left, salt = end - begin, i.to_bytes(8, "little") * 8
            while left:
                piece = (salt + chunk)[: min(left, len(chunk))]
                out.write(piece)
                left -= len(piece)
    tmp.replace(path)
    stamp.write_text(str(size))


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (random bf16 bits hold NaNs, which torch.equal rejects)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.reshape(-1).view(torch.uint8), b.to(a.device).reshape(-1).view(torch.uint8)
    )


class Caches:
    """The model in a memory-tier and a disk-tier cache, or, without the engine's
    dependencies, as plain files on tmpfs and on disk."""

    def __init__(self, work: Path, model: Path, size: int) -> None:
        self.note = ""
        shm = Path("/dev/shm")
        room = shm.is_dir() and shutil.disk_usage(shm).free > size * 1.3
        self.memory_root = Path(tempfile.mkdtemp(prefix="cachefs-gpu-", dir=shm)) if room else None
        self.disk_root = work / "disk"
        try:
            import fsspec
            import yaml

            import cachefs.node.embedded  # noqa: F401  (the engine's dependencies are here)
        except ImportError as exc:
            self.engine = False
            self.note = f"plain files instead of cachefs caches ({exc})"
        else:
            self.engine = True
        self.sources: dict[str, str] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self.files: dict[str, Path] = {}
        for tier, root in (("memory", self.memory_root), ("disk", self.disk_root)):
            if root is None:
                continue
            if not self.engine:
                target = root / "model.safetensors"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(model, target)
                self.sources[tier], self.options[tier], self.files[tier] = str(target), {}, target
                continue
            config = work / f"{tier}.yaml"
            quota = int(size * 1.2) + 64 * MiB
            tiers = [{"name": tier, "medium": tier, "path": str(root), "quota": quota}]
            config.write_text(yaml.safe_dump({"tiers": tiers, "block_size": "8MiB"}))
            options = {"config": str(config), "skip_instance_cache": True}
            url = "file://" + str(model)
            fs = fsspec.filesystem("cachefs", **options)
            fs.client.prefetch([url])
            self.files[tier] = Path(fs.open_local(url))
            self.sources[tier], self.options[tier] = "cachefs::" + url, options
        if self.memory_root is None:
            self.note = (self.note + "; " if self.note else "") + "no tmpfs with room at /dev/shm"

    def close(self) -> None:
        if self.memory_root is not None:
            shutil.rmtree(self.memory_root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, help="model size (4GiB; 256MiB without CUDA)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    parser.add_argument("--work", type=Path, help="scratch directory on disk (kept when given)")
    parser.add_argument("--threads", type=int, help="loader threads (default: its own)")
    parser.add_argument("--chunk-size", type=parse_size, default=32 * MiB)
    parser.add_argument("--pool-size", type=parse_size, default=256 * MiB)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip the other thread and chunk settings"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = device.type == "cuda"
    size = args.size or (4 * GiB if gpu else 256 * MiB)
    work = args.work or Path(tempfile.mkdtemp(prefix="cachefs-gpu-load-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, device {device}", end="")
    print(f" ({torch.cuda.get_device_name(device)})" if gpu else " (no CUDA: correctness pass)")
    try:
        return run(args, device, size, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, size: int, work: Path) -> int:
    gpu = device.type == "cuda"
    model = work / "origin" / "model.safetensors"
    started = time.perf_counter()
    write_model(model, size)
    size = model.stat().st_size
    print(f"model: {size / GiB:.2f} GiB in {time.perf_counter() - started:.1f} s")
    caches = Caches(work, model, size)
    if caches.note:
        print(f"note: {caches.note}")
    options: dict[str, Any] = {"chunk_size": args.chunk_size}
    if args.threads:
        options["threads"] = args.threads
    pool = BufferPool(args.chunk_size, max(1, args.pool_size // args.chunk_size), pin_memory=gpu)
    options["pool"] = pool
    if not gpu:
        options["staged"] = True  # the GPU's pipeline, with host copies
    reference_file = caches.files.get("memory") or caches.files["disk"]
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
        print("note: safetensors is not installed: its rows are left out")
    # On the CPU, for the checks.
    reference = (load_file or load_safetensors)(str(reference_file))
    if gpu:
        torch.ones(1, device=device).sum().item()  # CUDA context made before any clock

    def check(name: str, tensors: dict[str, torch.Tensor]) -> None:
        bad = [k for k in reference if k not in tensors or not same_bytes(tensors[k], reference[k])]
        if bad or len(tensors) != len(reference):
            raise SystemExit(f"{name}: {len(bad)} tensors differ from the file, e.g. {bad[:3]}")

    rows: list[dict[str, Any]] = []

    def measure(name: str, load: Callable[[], dict[str, torch.Tensor]], before=None) -> None:
        seconds = []
        for _ in range(args.runs):
            if before is not None:
                before()
            sync(device)
            start = time.perf_counter()
            tensors = load()
            sync(device)
            seconds.append(time.perf_counter() - start)
            check(name, tensors)
            del tensors
            if gpu:
                torch.cuda.empty_cache()
        row = {
            "name": name,
            "runs": seconds,
            "first_s": seconds[0],
            "best_s": min(seconds),
            "median_s": statistics.median(seconds),
            "best_gbps": size / 1e9 / min(seconds),
        }
        rows.append(row)
        print(
            f"  {name:52} first {seconds[0]:.3f} s  median {row['median_s']:.3f} s  "
            f"best {row['best_s']:.3f} s  {row['best_gbps']:.2f} GB/s",
            flush=True,
        )

    if gpu:
        buffer = torch.empty(min(size, GiB), dtype=torch.uint8, pin_memory=True)
        target = torch.empty_like(buffer, device=device)
        target.copy_(buffer, non_blocking=True)
        sync(device)
        times = []
        for _ in range(max(3, args.runs)):
            start = time.perf_counter()
            target.copy_(buffer, non_blocking=True)
            sync(device)
            times.append(time.perf_counter() - start)
        raw_gbps = buffer.numel() / 1e9 / min(times)
        rows.append({"name": "pinned host-to-device copy (raw)", "best_gbps": raw_gbps})
        print(f"  {'pinned host-to-device copy (raw)':52} {raw_gbps:.2f} GB/s")
        del buffer, target
        torch.cuda.empty_cache()

    label = "cachefs loader" + ("" if gpu else " (staged)")
    if "memory" in caches.sources:
        measure(
            f"{label}, memory tier",
            lambda: load_safetensors(
                caches.sources["memory"],
                device,
                storage_options=caches.options["memory"] or None,
                **options,
            ),
        )
    if gpu and "memory" in caches.sources and not args.no_sweep:
        # Other geometries of the pipeline, for tuning its defaults: (threads, chunk, pool).
        for threads, chunk, pool_size in ((4, 32, 256), (16, 16, 256), (16, 32, 512), (8, 64, 512)):
            swept = BufferPool(chunk * MiB, pool_size // chunk, pin_memory=True)
            measure(
                f"{label}, memory tier, {threads} threads, {chunk} MiB x {pool_size // chunk}",
                lambda t=threads, p=swept: load_safetensors(
                    caches.sources["memory"],
                    device,
                    storage_options=caches.options["memory"] or None,
                    threads=t,
                    pool=p,
                ),
            )
            del swept
    dropped = drop_caches()
    measure(
        f"{label}, disk tier" + (", page cache dropped" if dropped else ", page cache warm"),
        lambda: load_safetensors(
            caches.sources["disk"],
            device,
            storage_options=caches.options["disk"] or None,
            **options,
        ),
        before=drop_caches if dropped else None,
    )
    measure(
        f"{label}, disk tier, page cache warm",
        lambda: load_safetensors(
            caches.sources["disk"],
            device,
            storage_options=caches.options["disk"] or None,
            **options,
        ),
    )
    path = str(reference_file)
    if load_file is not None:
        measure(
            f"safetensors load_file(device={device.type!r})",
            lambda: load_file(path, device=str(device)),
        )
        measure(
            f"load_file on the CPU, then .to({device.type!r})",
            lambda: {k: v.to(device) for k, v in load_file(path).items()},
        )
    caches.close()
    print(
        f"pool: {pool.buffers} x {pool.buffer_size // MiB} MiB"
        f"{' pinned' if gpu else ''}, allocated {pool.allocated}, peak in use {pool.peak_in_use}"
    )
    verdict = ""
    if gpu:
        ours = next((r for r in rows if r["name"].endswith("memory tier")), None)
        base = next((r for r in rows if r["name"].startswith("safetensors load_file")), None)
        if ours is not None and base is not None:
            ratio = base["best_s"] / ours["best_s"]
            verdict = (
                f"warm (memory tier): {ours['best_gbps']:.2f} GB/s (target {TARGET_GBPS:g}), "
                f"{ratio:.2f}x load_file (target {TARGET_VS_LOAD_FILE:g}x): "
                + (
                    "MET"
                    if ours["best_gbps"] >= TARGET_GBPS and ratio >= TARGET_VS_LOAD_FILE
                    else "NOT MET"
                )
            )
    else:
        verdict = "no CUDA device: every loader checked on the CPU; GPU figures pending"
    print(verdict)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
                    "torch": torch.__version__,
                    "size": size,
                    "cpus": os.cpu_count(),
                    "note": caches.note,
                    "rows": rows,
                    "verdict": verdict,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
