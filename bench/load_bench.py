"""Time to weights in process memory: the cachefs loader against the usual loaders.

    python bench/load_bench.py [--size 2GiB] [--runs 2] [--out bench/out] [--tools ...]
                               [--no-prefault] [--load-wait 900]

A safetensors model of ``--size`` bytes (bf16 tensors shaped like a small Llama)
is served by ``rclone serve s3`` (pinned to ``--server-cpus``). Each loader runs in
a fresh Python process, timed inside around the load (imports excluded), and the
tensors it returns are checked against the file's bytes (xxh3 per tensor) after
the clock stops.

* **Warm**: the model is in a cachefs cache and in the page cache. The cachefs
  loader (through ``cachefs::s3://``, embedded and through a node, and from the
  data file's path), ``safetensors.torch.load_file`` (its default lazy mmap with
  every page touched, and ``backend="pread"``), ``safe_open`` and the Run:ai Model
  Streamer all read the same data file.
* **Cold**: the page cache is dropped before each run and the cache is empty. The
  cachefs loader streams from the origin while the cache fetches it; the Run:ai
  Model Streamer streams from S3; and two download-then-load pipelines.

See bench/README.md for the method and the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from origins import Origin, pinned, serve_s3, warm_etags

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench"
KEY = "llama/model.safetensors"
MiB = 1024 * 1024
GiB = 1024 * MiB
PREFAULT_FACTOR = 2.5  # memory touched right before each timed run, in model sizes
QUIET_LOAD = 0.8
BUSY = re.compile(r"grpc_bench|fanout_bench")  # other benchmarks that would disturb us

# --- the model -------------------------------------------------------------------------

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000


def model_layout(size: int) -> list[tuple[str, tuple[int, ...]]]:
    """bf16 tensors of a Llama-like model, as many layers as fit in ``size`` bytes."""
    embed = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    head = [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]

    def layer(i: int) -> list[tuple[str, tuple[int, ...]]]:
        p = f"model.layers.{i}."
        return [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]

    def nbytes(tensors: list[tuple[str, tuple[int, ...]]]) -> int:
        total = 0
        for _, shape in tensors:
            count = 1
            for d in shape:
                count *= d
            total += 2 * count
        return total

    tensors = list(embed)
    i = 0
    while nbytes(tensors + layer(i) + head) <= size:
        tensors += layer(i)
        i += 1
    return tensors + head


def write_model(path: Path, size: int) -> dict[str, str]:
    """Write a random bf16 safetensors model of about ``size`` bytes (once); return
    the xxh3-64 of every tensor's bytes (kept next to it as PATH.digests.json)."""
    digests_path = path.with_name(path.name + ".digests.json")
    layout = model_layout(size)
    if path.exists() and digests_path.exists():
        recorded = json.loads(digests_path.read_text())
        if recorded.get("size") == size and recorded.get("file_size") == path.stat().st_size:
            return recorded["tensors"]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digests: dict[str, str] = {}
    chunk = os.urandom(64 * MiB)  # random bytes, reused with a per-tensor twist: fast to make
    with tmp.open("wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, _) in enumerate(layout):
            begin, end = header[name]["data_offsets"]  # type: ignore[index]
            left, hasher = end - begin, xxhash.xxh3_64()
            salt = i.to_bytes(8, "little") * 8
            while left:
                piece = (
                    salt + chunk[: min(len(chunk), left) - len(salt)] if left > 64 else salt[:left]
                )
                hasher.update(piece)
                out.write(piece)
                left -= len(piece)
            digests[name] = hasher.hexdigest()
    tmp.replace(path)
    digests_path.write_text(
        json.dumps({"size": size, "file_size": path.stat().st_size, "tensors": digests})
    )
    return digests


# --- what each loader runs --------------------------------------------------------------
# ``python -c SNIPPET ARGS``: imports first (untimed), then the load, timed with
# perf_counter; then the check and one JSON line {"seconds", "bytes"}.

PRELUDE = """
import json, os, sys, time
os.environ.setdefault("RUNAI_STREAMER_LOG_LEVEL", "WARNING")
import torch
import xxhash

def touch(tensors):
    # safetensors maps the file lazily: fault every page in, as a model's first use would.
    for t in tensors.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].max()

def report(seconds, tensors, digests_path, **extra):
    expected = json.load(open(digests_path))["tensors"]
    if sorted(tensors) != sorted(expected):
        raise SystemExit(f"{len(tensors)} tensors loaded, {len(expected)} expected")
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        if xxhash.xxh3_64_hexdigest(raw) != expected[name]:
            raise SystemExit(f"{name}: its bytes differ from the file's")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"seconds": seconds, "bytes": nbytes, **extra}))
"""

CACHEFS_LOADER = (
    PRELUDE
    + """
from cachefs.loaders import SafetensorsLoader
import cachefs.filesystem
source, options, digests, extra = sys.argv[1:5]
options, extra = json.loads(options), json.loads(extra)
if options.get("endpoint"):
    import cachefs.client
elif options:
    import cachefs.node.embedded, cachefs.node.origins.s3, s3fs
start = time.perf_counter()
loader = SafetensorsLoader(source, storage_options=options or None, **extra)
tensors = dict(loader)
if extra.get("mmap"):
    touch(tensors)
seconds = time.perf_counter() - start
s = loader.stats
report(seconds, tensors, digests, first_tensor=s.first_tensor_seconds, threads=s.threads,
       client_reads=s.client_reads, local_reads=s.local_reads)
"""
)

CACHEFS_PREFETCH_THEN_LOAD = (
    PRELUDE
    + """
import fsspec
from cachefs.loaders import load_safetensors
import cachefs.filesystem, cachefs.node.embedded, cachefs.node.origins.s3, s3fs
url, cache_dir, digests, extra = sys.argv[1:5]
extra = json.loads(extra)
start = time.perf_counter()
fs = fsspec.filesystem("cachefs", cache_dir=cache_dir)
fs.client.prefetch([url])
tensors = load_safetensors("cachefs::" + url, filesystem=fs, **extra)
if extra.get("mmap"):
    touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)

LOAD_FILE_MMAP = (
    PRELUDE
    + """
from safetensors.torch import load_file
path, digests = sys.argv[1:3]
start = time.perf_counter()
tensors = load_file(path)
touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)

LOAD_FILE_PREAD = (
    PRELUDE
    + """
from safetensors.torch import load_file
path, digests = sys.argv[1:3]
start = time.perf_counter()
tensors = load_file(path, backend="pread")
report(time.perf_counter() - start, tensors, digests)
"""
)

SAFE_OPEN = (
    PRELUDE
    + """
from safetensors import safe_open
path, digests = sys.argv[1:3]
start = time.perf_counter()
with safe_open(path, "pt") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)

RUNAI = (
    PRELUDE
    + """
from runai_model_streamer import SafetensorsStreamer
path, digests = sys.argv[1:3]
start = time.perf_counter()
with SafetensorsStreamer() as streamer:
    streamer.stream_file(path)
    tensors = dict(streamer.get_tensors())
report(time.perf_counter() - start, tensors, digests)
"""
)

BOTO3_THEN_LOAD = (
    PRELUDE
    + """
import boto3
from boto3.s3.transfer import TransferConfig
from safetensors.torch import load_file
bucket, key, dest, digests = sys.argv[1:5]
config = TransferConfig(max_concurrency=16, multipart_chunksize=8 * 2**20,
                        multipart_threshold=8 * 2**20, preferred_transfer_client="classic")
start = time.perf_counter()
boto3.client("s3").download_file(bucket, key, dest, Config=config)
tensors = load_file(dest)
touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)

PREFAULT = "import sys; b = b'\\x01' * int(sys.argv[1])"


@dataclass
class Context:
    """What a run needs: the origin, the warm cache, a fresh scratch directory."""

    origin: Origin
    digests: Path
    warm_cache: Path
    data_file: Path
    scratch: Path  # empty, removed after the run
    node_endpoint: str | None

    @property
    def url(self) -> str:
        return self.origin.url(BUCKET, KEY)


@dataclass(frozen=True)
class Tool:
    name: str
    section: str  # "warm" or "cold"
    argv: Callable[[Context], list[str] | None]  # None: cannot run (says why elsewhere)
    subject: bool = False
    baseline: bool = False


def _py(snippet: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(snippet), *args]


def _loader(source: Callable[[Context], str], options: Callable[[Context], dict], **extra):
    def argv(ctx: Context) -> list[str]:
        return _py(
            CACHEFS_LOADER,
            source(ctx),
            json.dumps(options(ctx)),
            str(ctx.digests),
            json.dumps(extra),
        )

    return argv


def _node_loader(**extra: object) -> Callable[[Context], list[str] | None]:
    def argv(ctx: Context) -> list[str] | None:
        if ctx.node_endpoint is None:
            return None
        return _loader(
            lambda c: "cachefs::" + c.url, lambda c: {"endpoint": c.node_endpoint}, **extra
        )(ctx)

    return argv


def _prefetch_then_load(**extra: object) -> Callable[[Context], list[str]]:
    def argv(ctx: Context) -> list[str]:
        return _py(
            CACHEFS_PREFETCH_THEN_LOAD,
            ctx.url,
            str(ctx.scratch),
            str(ctx.digests),
            json.dumps(extra),
        )

    return argv


TOOLS: tuple[Tool, ...] = (
    Tool("cachefs loader, cachefs:: URL (node)", "warm", _node_loader(), subject=True),
    Tool(
        "cachefs loader, cachefs:: URL (node), mmap=True + touch",
        "warm",
        _node_loader(mmap=True),
        subject=True,
    ),
    Tool(
        "cachefs loader, cachefs:: URL (embedded)",
        "warm",
        _loader(lambda c: "cachefs::" + c.url, lambda c: {"cache_dir": str(c.warm_cache)}),
        subject=True,
    ),
    Tool(
        "cachefs loader, data file path",
        "warm",
        _loader(lambda c: str(c.data_file), lambda c: {}),
        subject=True,
    ),
    Tool(
        "cachefs loader, data file path, mmap=True + touch",
        "warm",
        _loader(lambda c: str(c.data_file), lambda c: {}, mmap=True),
        subject=True,
    ),
    Tool(
        "cachefs loader, data file path, staged",
        "warm",
        _loader(lambda c: str(c.data_file), lambda c: {}, staged=True),
        subject=True,
    ),
    Tool(
        "safetensors load_file + touch",
        "warm",
        lambda c: _py(LOAD_FILE_MMAP, str(c.data_file), str(c.digests)),
        baseline=True,
    ),
    Tool(
        'safetensors load_file(backend="pread")',
        "warm",
        lambda c: _py(LOAD_FILE_PREAD, str(c.data_file), str(c.digests)),
    ),
    Tool(
        "safetensors safe_open + get_tensor + touch",
        "warm",
        lambda c: _py(SAFE_OPEN, str(c.data_file), str(c.digests)),
    ),
    Tool(
        "Run:ai Model Streamer, file",
        "warm",
        lambda c: _py(RUNAI, str(c.data_file), str(c.digests)),
    ),
    Tool(
        "cachefs loader, cachefs::s3:// streaming",
        "cold",
        _loader(lambda c: "cachefs::" + c.url, lambda c: {"cache_dir": str(c.scratch)}),
        subject=True,
    ),
    Tool(
        "Run:ai Model Streamer, s3://",
        "cold",
        lambda c: _py(RUNAI, c.url, str(c.digests)),
    ),
    Tool(
        "cachefs prefetch, then cachefs loader",
        "cold",
        _prefetch_then_load(),
        subject=True,
    ),
    Tool(
        "cachefs prefetch, then cachefs loader mmap=True + touch",
        "cold",
        _prefetch_then_load(mmap=True),
        subject=True,
    ),
    Tool(
        "boto3 download, then load_file + touch",
        "cold",
        lambda c: _py(
            BOTO3_THEN_LOAD, BUCKET, KEY, str(c.scratch / "model.safetensors"), str(c.digests)
        ),
        baseline=True,
    ),
)


# --- running ---------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    section: str
    subject: bool
    baseline: bool
    seconds: list[float] = field(default_factory=list)
    first_tensor: list[float] = field(default_factory=list)
    error: str | None = None

    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def read_file(path: Path) -> None:
    buf = memoryview(bytearray(64 * MiB))
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no output"
    return lines[-1][:200]


def run_one(argv: list[str], cpus: str | None, env: dict[str, str], timeout: float) -> dict:
    proc = subprocess.run(
        pinned(argv, cpus),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {error_line(proc.stderr or proc.stdout)}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise RuntimeError(f"no result line: {proc.stdout[-200:]!r}") from exc


def prefault(nbytes: int, cpus: str | None) -> None:
    if nbytes:
        subprocess.run(pinned([sys.executable, "-c", PREFAULT, str(nbytes)], cpus), check=True)


def wait_until_quiet(timeout: float) -> None:
    """Wait for other benchmarks to end and the 1-minute load average to fall."""
    deadline = time.monotonic() + timeout
    while True:
        busy = subprocess.run(
            ["pgrep", "-f", BUSY.pattern], capture_output=True, text=True, check=False
        ).stdout.split()
        busy = [pid for pid in busy if int(pid) != os.getpid()]
        load = os.getloadavg()[0]
        if not busy and load < QUIET_LOAD:
            print(f"quiet: load average {load:.2f}, no other benchmark running", flush=True)
            return
        if time.monotonic() > deadline:
            print(f"still busy after {timeout:.0f} s (load {load:.2f}): going on", flush=True)
            return
        print(f"  waiting: load average {load:.2f}, other benchmarks {busy}", flush=True)
        time.sleep(10)


def client_env(origin: Origin) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "AWS_"))}
    env.update(origin.env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] = "0"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def start_node(cache: Path, socket: Path, env: dict[str, str], cpus: str | None, log: Path):
    argv = [
        sys.executable,
        "-m",
        "cachefs.cli",
        "--cache-dir",
        str(cache),
        "node",
        "--socket",
        str(socket),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pinned(argv, cpus), env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 30
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the node did not start: {error_line(log.read_text())}")
        time.sleep(0.1)
    return proc


def table(title: str, results: list[Result], size: int, note: str) -> str:
    base = next((r.median() for r in results if r.baseline and r.median()), None)
    lines = [
        f"### {title}",
        "",
        "| loader | runs | median s | GB/s | first tensor s | vs baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = f"**{r.name}**" if r.subject else r.name
        if r.error or not r.seconds:
            lines.append(f"| {name} | {len(r.seconds)} | error: {r.error} | | | |")
            continue
        median = r.median() or 0.0
        first = f"{statistics.median(r.first_tensor):.3f}" if r.first_tensor else ""
        ratio = "baseline" if r.baseline else (f"{base / median:.2f}x" if base else "")
        lines.append(
            f"| {name} | {len(r.seconds)} | {median:.3f} | {size / 1e9 / median:.2f} | "
            f"{first} | {ratio} |"
        )
    return "\n".join([*lines, "", note, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2GiB", help="model size (default 2GiB)")
    parser.add_argument("--runs", type=int, default=2, help="runs per loader (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--work", type=Path, help="scratch directory (kept when given)")
    parser.add_argument("--tools", nargs="+", help="only loaders whose name contains one of these")
    parser.add_argument("--sections", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1", help="CPUs of the loaders in cold runs")
    parser.add_argument("--warm-cpus", default="0,1", help="CPUs of the loaders in warm runs")
    parser.add_argument("--no-prefault", action="store_true")
    parser.add_argument("--load-wait", type=float, default=900, help="seconds to wait for quiet")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    size = _parse_size(args.size)
    work = args.work or Path(tempfile.mkdtemp(prefix="cachefs-load-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, size, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise SystemExit(f"not a size: {text!r}")
    unit = (match.group(2) or "B").lower()
    factor = {
        "b": 1,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
    }
    return int(float(match.group(1)) * factor[unit])


def _run(args: argparse.Namespace, size: int, work: Path) -> int:
    root = work / "origin"
    source = root / BUCKET / KEY
    print(f"model: {source} (about {size / GiB:g} GiB of bf16)", flush=True)
    write_model(source, size)
    digests_path = source.with_name(source.name + ".digests.json")
    file_size = source.stat().st_size
    tools = [
        t
        for t in TOOLS
        if t.section in args.sections
        and (not args.tools or any(w.lower() in t.name.lower() for w in args.tools))
    ]
    prefault_bytes = 0 if args.no_prefault else int(file_size * PREFAULT_FACTOR)
    results = {t.name: Result(t.name, t.section, t.subject, t.baseline) for t in tools}
    if args.load_wait > 0:
        wait_until_quiet(args.load_wait)
    node = None
    with serve_s3(root, cpus=args.server_cpus, log_dir=work) as origin:
        env = client_env(origin)
        hashing = warm_etags(origin, [(BUCKET, KEY)])
        print(f"s3 origin at {origin.endpoint}; first HEAD {hashing:.2f} s", flush=True)
        warm_cache = work / "warm-cache"
        data_file = Path("/nonexistent")
        if any(t.section == "warm" for t in tools):
            shutil.rmtree(warm_cache, ignore_errors=True)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "cachefs.cli",
                    "--cache-dir",
                    str(warm_cache),
                    "prefetch",
                    origin.url(BUCKET, KEY),
                    "--json",
                ],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode:
                raise SystemExit(f"prefetch into the warm cache failed: {error_line(out.stderr)}")
            (data_file,) = warm_cache.glob("v1/objects/*/*/data")
            if any("(node)" in t.name for t in tools):
                node_socket = work / "node.sock"
                node = start_node(warm_cache, node_socket, env, args.server_cpus, work / "node.log")
        endpoint = f"unix://{work / 'node.sock'}" if node is not None else None
        try:
            for section in ("warm", "cold"):
                chosen = [t for t in tools if t.section == section]
                for run in range(args.runs + (1 if section == "warm" else 0)):
                    untimed = section == "warm" and run == 0  # first warm pass: caches, node
                    for tool in chosen:
                        result = results[tool.name]
                        if result.error:
                            continue
                        scratch = work / "scratch"
                        shutil.rmtree(scratch, ignore_errors=True)
                        scratch.mkdir()
                        ctx = Context(
                            origin, digests_path, warm_cache, data_file, scratch, endpoint
                        )
                        command = tool.argv(ctx)
                        if command is None:
                            result.error = "not available"
                            continue
                        if section == "cold":
                            drop_caches()
                            read_file(source)  # the origin serves from memory, as a network would
                            warm_etags(origin, [(BUCKET, KEY)])
                        else:
                            read_file(data_file)
                        cpus = args.client_cpus if section == "cold" else args.warm_cpus
                        prefault(prefault_bytes, cpus)
                        try:
                            doc = run_one(command, cpus, env, args.timeout)
                        except (RuntimeError, subprocess.TimeoutExpired) as exc:
                            result.error = str(exc)
                            print(f"  {section} {tool.name}: {result.error}", flush=True)
                            continue
                        finally:
                            shutil.rmtree(scratch, ignore_errors=True)
                        label = "untimed" if untimed else f"run {run + (section == 'cold')}"
                        print(
                            f"  {section} {label:8} {tool.name:45} {doc['seconds']:.3f} s "
                            f"{doc['bytes'] / 1e9 / doc['seconds']:.2f} GB/s",
                            flush=True,
                        )
                        if not untimed:
                            result.seconds.append(float(doc["seconds"]))
                            if doc.get("first_tensor") is not None:
                                result.first_tensor.append(float(doc["first_tensor"]))
        finally:
            if node is not None:
                node.terminate()
                node.wait(timeout=30)
    args.out.mkdir(parents=True, exist_ok=True)
    model_bytes = file_size
    method = (
        f"{args.runs} run(s) each, round robin, each a fresh process timed inside around the "
        f"load (imports excluded) and checked by xxh3 per tensor afterwards; "
        + (
            "memory not pre-faulted"
            if not prefault_bytes
            else f"{prefault_bytes / GiB:.1f} GiB of memory touched and freed right before each run"
        )
    )
    markdown = [
        table(
            f"Warm: {model_bytes / GiB:.2f} GiB model in the cache and the page cache",
            [r for r in results.values() if r.section == "warm"],
            model_bytes,
            f"Loaders on CPUs {args.warm_cpus}; one untimed pass first; {method}.",
        ),
        table(
            f"Cold: {model_bytes / GiB:.2f} GiB model from a local S3 origin (rclone serve s3)",
            [r for r in results.values() if r.section == "cold"],
            model_bytes,
            f"Origin on CPUs {args.server_cpus}, serving from memory; loaders on CPUs "
            f"{args.client_cpus}; page cache dropped and the cache empty before each run; "
            f"{method}.",
        ),
    ]
    text = "\n".join(markdown)
    (args.out / "load.md").write_text(text)
    (args.out / "load.json").write_text(
        json.dumps(
            {
                "size": model_bytes,
                "runs": args.runs,
                "results": [r.__dict__ for r in results.values()],
            },
            indent=2,
        )
    )
    print("\n" + text)
    print(f"wrote {args.out / 'load.md'} and {args.out / 'load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
