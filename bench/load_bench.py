"""Time to weights in process memory: the cachefs loader against the usual loaders.

    python bench/load_bench.py [--size 2GiB] [--shards 4] [--runs 3] [--sections warm cold]
                               [--origins fast throttled] [--rate 50MB] [--delay 0.03]
                               [--out bench/out] [--tools ...] [--no-prefault] [--load-wait 900]
                               [--compare OLD_TREE]

A safetensors model of ``--size`` bytes (bf16 tensors shaped like a small Llama) in
``--shards`` shards with their ``model.safetensors.index.json`` is served by
``rclone serve s3`` (pinned to ``--server-cpus``). Each loader runs in a fresh Python
process, timed inside around the load (imports excluded), and the tensors it returns
are checked against the files' bytes (xxh3 per tensor) after the clock stops.

* **Warm**: the model is in a cachefs cache and in the page cache. The cachefs
  loader (through ``cachefs::s3://``, embedded and through a node, and from a view
  of the data files), ``safetensors.torch.load_file`` (its default lazy mmap with
  every page touched, and ``backend="pread"``), ``safe_open`` and the Run:ai Model
  Streamer all read the same data files.
* **Cold**: the page cache is dropped before each run and the cache is empty. Four
  rows: ``s5cmd cp`` then ``load_file`` (the baseline), the cachefs loader
  streaming from the origin while the cache fetches it, a cachefs prefetch then the
  loader with ``mmap=True``, and the Run:ai Model Streamer streaming from S3. Once
  against the origin on loopback (``fast``), once behind ``throttle.py``
  (``throttled``: ``--rate`` per connection, ``--delay`` to each first byte, as
  object storage serves).

With ``--compare OLD_TREE`` every cachefs row runs twice in the same round robin: once
with cachefs imported from that older source tree (the row marked ``(before)``) and
once from this one, so a change's speed-up is measured in one run on one machine.

See bench/README.md for the method and the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from origins import Origin, pinned, read_through, serve_s3, warm_etags
from source_tree import cachefs_argv, source_tree
from throttle import parse_rate

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench"
PREFIX = "llama/"
INDEX = "model.safetensors.index.json"
MiB = 1024 * 1024
GiB = 1024 * MiB
PREFAULT_FACTOR = 2.5  # memory touched right before each timed run, in model sizes
QUIET_LOAD = 0.8
BUSY = re.compile(r"grpc_bench|fanout_bench")  # other benchmarks that would disturb us

# --- the model -------------------------------------------------------------------------

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000
Layout = list[tuple[str, tuple[int, ...]]]


def _nbytes(tensors: Layout) -> int:
    total = 0
    for _, shape in tensors:
        count = 1
        for d in shape:
            count *= d
        total += 2 * count
    return total


def model_layout(size: int, shards: int) -> list[Layout]:
    """bf16 tensors of a Llama-like model, as many layers as fit in ``size`` bytes, cut
    into ``shards`` files of about equal size in layer order (as Hugging Face does)."""
    embed = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    head = [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]

    def layer(i: int) -> Layout:
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

    tensors = list(embed)
    i = 0
    while _nbytes(tensors + layer(i) + head) <= size:
        tensors += layer(i)
        i += 1
    tensors += head
    total, done = _nbytes(tensors), 0
    cut: list[Layout] = [[] for _ in range(shards)]
    for name_shape in tensors:  # each tensor into the shard its middle byte falls in
        nbytes = _nbytes([name_shape])
        cut[min(shards - 1, (done + nbytes // 2) * shards // total)].append(name_shape)
        done += nbytes
    return [c for c in cut if c]


def shard_name(i: int, shards: int) -> str:
    return f"model-{i + 1:05d}-of-{shards:05d}.safetensors"


def write_model(directory: Path, size: int, shards: int, digests_path: Path) -> dict[str, str]:
    """Write a random bf16 model of about ``size`` bytes in ``shards`` files and its
    index into ``directory`` (once); return the xxh3-64 of every tensor's bytes (kept
    in ``digests_path``, outside the served directory)."""
    layout = model_layout(size, shards)
    names = [shard_name(i, len(layout)) for i in range(len(layout))]
    if digests_path.exists() and all((directory / n).exists() for n in names):
        recorded = json.loads(digests_path.read_text())
        if recorded.get("size") == size and recorded.get("files") == {
            n: (directory / n).stat().st_size for n in names
        }:
            return recorded["tensors"]
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    digests: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    chunk = os.urandom(64 * MiB)  # random bytes, reused with a per-tensor twist: fast to make
    salt_index = 0
    for name, tensors in zip(names, layout, strict=True):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor, shape in tensors:
            count = 1
            for d in shape:
                count *= d
            header[tensor] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + 2 * count],
            }
            offset += 2 * count
            weight_map[tensor] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (directory / name).open("wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for tensor, _ in tensors:
                begin, end = header[tensor]["data_offsets"]  # type: ignore[index]
                left, hasher = end - begin, xxhash.xxh3_64()
                salt = salt_index.to_bytes(8, "little") * 8
                salt_index += 1
                while left:
                    piece = (
                        salt + chunk[: min(len(chunk), left) - len(salt)]
                        if left > 64
                        else salt[:left]
                    )
                    hasher.update(piece)
                    out.write(piece)
                    left -= len(piece)
                digests[tensor] = hasher.hexdigest()
    (directory / INDEX).write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(_nbytes(t) for t in layout)},
                "weight_map": weight_map,
            }
        )
    )
    digests_path.write_text(
        json.dumps(
            {
                "size": size,
                "files": {n: (directory / n).stat().st_size for n in names},
                "tensors": digests,
            }
        )
    )
    return digests


# --- what each loader runs --------------------------------------------------------------
# ``python -c SNIPPET ARGS``: imports first (untimed), memory touched and freed, then the
# load, timed with perf_counter (and its CPU time counted); then the check and one JSON
# line {"seconds", "cpu", "bytes"}.

PRELUDE = """
import json, os, resource, sys, time
os.environ.setdefault("RUNAI_STREAMER_LOG_LEVEL", "WARNING")
import torch
import xxhash

def touch(tensors):
    # safetensors maps the file lazily: fault every page in, as a model's first use would.
    for t in tensors.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].max()

def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

def begin():
    # Memory touched and freed right before the clock starts (imports take longer than
    # this VM keeps freed memory), then wall time and this process's and children's CPU.
    global CPU_AT_START
    touched = b"\x01" * int(os.environ.get("LOAD_BENCH_PREFAULT", "0"))
    del touched
    CPU_AT_START = cpu()
    return time.perf_counter()

def report(seconds, tensors, digests_path, **extra):
    used = cpu() - CPU_AT_START
    expected = json.load(open(digests_path))["tensors"]
    if sorted(tensors) != sorted(expected):
        raise SystemExit(f"{len(tensors)} tensors loaded, {len(expected)} expected")
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        if xxhash.xxh3_64_hexdigest(raw) != expected[name]:
            raise SystemExit(f"{name}: its bytes differ from the file's")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"seconds": seconds, "cpu": used, "bytes": nbytes, **extra}))
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
start = begin()
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
start = begin()
fs = fsspec.filesystem("cachefs", cache_dir=cache_dir)
fs.client.prefetch([url])
tensors = load_safetensors("cachefs::" + url, filesystem=fs, **extra)
if extra.get("mmap"):
    touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)

SHARDS = """
def shards(directory):
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if n.endswith(".safetensors")]
"""

LOAD_FILE_MMAP = (
    PRELUDE
    + SHARDS
    + """
from safetensors.torch import load_file
directory, digests = sys.argv[1:3]
start = begin()
tensors = {}
for path in shards(directory):
    tensors.update(load_file(path))
touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)

LOAD_FILE_PREAD = (
    PRELUDE
    + SHARDS
    + """
from safetensors.torch import load_file
directory, digests = sys.argv[1:3]
start = begin()
tensors = {}
for path in shards(directory):
    tensors.update(load_file(path, backend="pread"))
report(time.perf_counter() - start, tensors, digests)
"""
)

SAFE_OPEN = (
    PRELUDE
    + SHARDS
    + """
from safetensors import safe_open
directory, digests = sys.argv[1:3]
start = begin()
tensors = {}
for path in shards(directory):
    with safe_open(path, "pt") as f:
        tensors.update({name: f.get_tensor(name) for name in f.keys()})
touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)

RUNAI = (
    PRELUDE
    + """
from runai_model_streamer import SafetensorsStreamer
digests, paths = sys.argv[1], sys.argv[2:]
start = begin()
with SafetensorsStreamer() as streamer:
    streamer.stream_files(paths)
    tensors = dict(streamer.get_tensors())
report(time.perf_counter() - start, tensors, digests)
"""
)

S5CMD_THEN_LOAD = (
    PRELUDE
    + SHARDS
    + """
import subprocess
from safetensors.torch import load_file
s5cmd, endpoint, prefix, dest, digests = sys.argv[1:6]
start = begin()
subprocess.run([s5cmd, "--endpoint-url", endpoint, "cp", prefix + "*", dest + "/"],
               check=True, stdout=subprocess.DEVNULL)
tensors = {}
for path in shards(dest):
    tensors.update(load_file(path))
touch(tensors)
report(time.perf_counter() - start, tensors, digests)
"""
)


@dataclass
class Context:
    """What a run needs: the origin, the warm cache, a fresh scratch directory."""

    origin: Origin
    digests: Path
    warm_cache: Path  # embedded mode's (a node's cache is the node's alone)
    model_dir: Path  # warm: a view of the warm cache's data files, under origin names
    shards: list[str]  # the shards' keys under the bucket
    scratch: Path  # empty, removed after the run
    node_endpoint: str | None

    @property
    def url(self) -> str:
        """The model's prefix at the origin."""
        return self.origin.url(BUCKET, PREFIX)


@dataclass(frozen=True)
class Tool:
    name: str
    section: str  # "warm" or "cold"
    argv: Callable[[Context], list[str] | None]  # None: cannot run (says why elsewhere)
    subject: bool = False
    baseline: bool = False
    target: float | None = None  # the most of the baseline's time the row may take


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


def _runai_files(ctx: Context) -> list[str]:
    paths = sorted(str(p) for p in ctx.model_dir.glob("*.safetensors"))
    return _py(RUNAI, str(ctx.digests), *paths)


def _runai_s3(ctx: Context) -> list[str]:
    return _py(RUNAI, str(ctx.digests), *(ctx.origin.url(BUCKET, key) for key in ctx.shards))


def _s5cmd_then_load(ctx: Context) -> list[str]:
    binary = Path(sys.executable).parent / "s5cmd"
    return _py(
        S5CMD_THEN_LOAD,
        str(binary) if binary.exists() else (shutil.which("s5cmd") or "s5cmd"),
        ctx.origin.endpoint,
        ctx.url,
        str(ctx.scratch),
        str(ctx.digests),
    )


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
        "cachefs loader, view directory",
        "warm",
        _loader(lambda c: str(c.model_dir), lambda c: {}),
        subject=True,
    ),
    Tool(
        "cachefs loader, view directory, mmap=True + touch",
        "warm",
        _loader(lambda c: str(c.model_dir), lambda c: {}, mmap=True),
        subject=True,
    ),
    Tool(
        "cachefs loader, view directory, staged",
        "warm",
        _loader(lambda c: str(c.model_dir), lambda c: {}, staged=True),
        subject=True,
    ),
    Tool(
        "safetensors load_file + touch",
        "warm",
        lambda c: _py(LOAD_FILE_MMAP, str(c.model_dir), str(c.digests)),
        baseline=True,
    ),
    Tool(
        'safetensors load_file(backend="pread")',
        "warm",
        lambda c: _py(LOAD_FILE_PREAD, str(c.model_dir), str(c.digests)),
    ),
    Tool(
        "safetensors safe_open + get_tensor + touch",
        "warm",
        lambda c: _py(SAFE_OPEN, str(c.model_dir), str(c.digests)),
    ),
    Tool("Run:ai Model Streamer, files", "warm", _runai_files),
    Tool("s5cmd cp, then load_file + touch", "cold", _s5cmd_then_load, baseline=True),
    Tool(
        "cachefs loader, cachefs::s3:// streaming",
        "cold",
        _loader(lambda c: "cachefs::" + c.url, lambda c: {"cache_dir": str(c.scratch)}),
        subject=True,
        target=0.85,
    ),
    Tool(
        "cachefs prefetch, then cachefs loader mmap=True + touch",
        "cold",
        _prefetch_then_load(mmap=True),
        subject=True,
        target=0.8,
    ),
    Tool("Run:ai Model Streamer, s3://", "cold", _runai_s3),
)


# --- running ---------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    section: str
    subject: bool
    baseline: bool
    target: float | None = None
    tool: str = ""  # the Tool this row runs (its name; a "(before)" row's differs)
    tree: Path | None = None  # the source tree cachefs is imported from (None: installed)
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds of the loader's processes
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


@contextlib.contextmanager
def throttled(
    origin: Origin, rate: float, delay: float, cpus: str | None, log: Path
) -> Iterator[Origin]:
    """``origin`` behind ``throttle.py`` (pinned with the origin): the same origin,
    its endpoint the proxy's."""
    argv = [
        sys.executable,
        str(Path(__file__).with_name("throttle.py")),
        "--upstream",
        origin.endpoint.removeprefix("http://"),
        "--rate",
        str(rate),
        "--delay",
        str(delay),
    ]
    with log.open("wb") as errors:
        proxy = subprocess.Popen(
            pinned(argv, cpus), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
        )
    try:
        assert proxy.stdout is not None
        line = proxy.stdout.readline()
        if not line:
            raise RuntimeError(f"throttle.py exited with {proxy.wait()}: see {log}")
        address = json.loads(line)["address"]
        yield dataclasses.replace(origin, endpoint=f"http://{address}")
    finally:
        if proxy.stdin is not None:
            proxy.stdin.close()  # end of input stops it
        try:
            proxy.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


def table(title: str, results: list[Result], size: int, note: str) -> str:
    base = next((r.median() for r in results if r.baseline and r.median()), None)
    lines = [
        f"### {title}",
        "",
        "| loader | runs | median s (range) | GB/s | CPU s | first tensor s | time / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for r in results:
        name = f"**{r.name}**" if r.subject else r.name
        if r.error or not r.seconds:
            lines.append(f"| {name} | {len(r.seconds)} | error: {r.error} | | | | |")
            continue
        median = r.median() or 0.0
        first = f"{statistics.median(r.first_tensor):.3f}" if r.first_tensor else ""
        cpu = f"{statistics.median(r.cpu):.2f}" if r.cpu else ""
        ratio = "baseline" if r.baseline else (f"{median / base:.2f}" if base else "")
        spread = f" ({min(r.seconds):.2f}-{max(r.seconds):.2f})" if len(r.seconds) > 1 else ""
        lines.append(
            f"| {name} | {len(r.seconds)} | {median:.3f}{spread} | {size / 1e9 / median:.2f} | "
            f"{cpu} | {first} | {ratio} |"
        )
        if r.target is not None and base:
            met = "met" if median / base <= r.target else "NOT met"
            verdicts.append(
                f"- {r.name}: {median / base:.2f} of the baseline's time "
                f"(target at most {r.target}): {met}."
            )
    return "\n".join([*lines, "", *verdicts, *([""] if verdicts else []), note, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2GiB", help="model size (default 2GiB)")
    parser.add_argument("--shards", type=int, default=4, help="shard files (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="runs per loader (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--work", type=Path, help="scratch directory (kept when given)")
    parser.add_argument("--tools", nargs="+", help="only loaders whose name contains one of these")
    parser.add_argument("--sections", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument(
        "--origins",
        nargs="+",
        default=["fast", "throttled"],
        choices=["fast", "throttled"],
        help="cold: the origin on loopback, and behind the throttling proxy",
    )
    parser.add_argument("--rate", type=parse_rate, default=50e6, help="throttled: per connection")
    parser.add_argument("--delay", type=float, default=0.03, help="throttled: s to first byte")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1", help="CPUs of the loaders in cold runs")
    parser.add_argument("--warm-cpus", default="0,1", help="CPUs of the loaders in warm runs")
    parser.add_argument("--no-prefault", action="store_true")
    parser.add_argument("--load-wait", type=float, default=900, help="seconds to wait for quiet")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--compare",
        type=source_tree,
        help="an older cachefs source tree: every cachefs row also runs from it, '(before)'",
    )
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


def rows_of(tool: Tool, compare: Path | None) -> list[Result]:
    """The rows of one tool: with ``compare``, a cachefs tool's run from the older tree
    first, then from this one (both through the same boot, so alike but for the code)."""

    def row(name: str, tree: Path | None, target: float | None) -> Result:
        return Result(name, tool.section, tool.subject, tool.baseline, target, tool.name, tree)

    if compare is None or not tool.subject:
        return [row(tool.name, None, tool.target)]
    return [row(f"{tool.name} (before)", compare, None), row(tool.name, REPO, tool.target)]


@dataclass
class Group:
    """One table: a section against one origin, its results and the load around it."""

    section: str
    origin: str  # "fast" or "throttled" ("fast" for warm)
    results: dict[str, Result]
    load: list[float] = field(default_factory=list)  # 1-minute load average, start and end


def _cachefs(env: dict[str, str], *argv: str) -> str:
    out = subprocess.run(
        [sys.executable, *argv], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[:4])} failed: {error_line(out.stderr)}")
    return out.stdout.strip()


def _run(args: argparse.Namespace, size: int, work: Path) -> int:
    root = work / "origin"
    model = root / BUCKET / PREFIX
    digests_path = work / "model.digests.json"
    print(f"model: {model} (about {size / GiB:g} GiB of bf16 in {args.shards} shards)", flush=True)
    write_model(model, size, args.shards, digests_path)
    files = sorted(p for p in model.iterdir() if p.is_file())
    shards = [PREFIX + p.name for p in files if p.name.endswith(".safetensors")]
    model_bytes = sum(p.stat().st_size for p in files if p.name.endswith(".safetensors"))
    chosen = [
        t
        for t in TOOLS
        if t.section in args.sections
        and (not args.tools or any(w.lower() in t.name.lower() for w in args.tools))
    ]
    prefault_bytes = 0 if args.no_prefault else int(model_bytes * PREFAULT_FACTOR)
    groups = [
        Group(
            section,
            origin,
            {r.name: r for t in chosen if t.section == section for r in rows_of(t, args.compare)},
        )
        for section, origins in (("warm", ["fast"]), ("cold", args.origins))
        for origin in origins
    ]
    groups = [g for g in groups if g.results]
    if args.load_wait > 0:
        wait_until_quiet(args.load_wait)
    objects = [(BUCKET, PREFIX + p.name) for p in files]
    with serve_s3(root, cpus=args.server_cpus, log_dir=work) as origin:
        hashing = warm_etags(origin, objects)
        first = read_through(origin, BUCKET, shards[0])
        print(
            f"s3 origin at {origin.endpoint}; first HEADs {hashing:.2f} s, first GET {first:.2f} s",
            flush=True,
        )
        for group in groups:
            with contextlib.ExitStack() as stack:
                served = origin
                if group.origin == "throttled":
                    served = stack.enter_context(
                        throttled(origin, args.rate, args.delay, args.server_cpus, work / "t.log")
                    )
                    print(
                        f"throttled origin {served.endpoint}: {args.rate / 1e6:g} MB/s per "
                        f"connection, {args.delay * 1000:g} ms to first byte",
                        flush=True,
                    )
                _run_group(
                    args, group, stack, served, work, digests_path, shards, files, prefault_bytes
                )
                group.load.append(os.getloadavg()[0])
                print(f"  1-minute load average after: {group.load[-1]:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    method = (
        f"{args.runs} run(s) each, round robin, each a fresh process timed inside around the "
        f"load (imports excluded) and checked by xxh3 per tensor afterwards; "
        + (
            "memory not pre-faulted"
            if not prefault_bytes
            else f"{prefault_bytes / GiB:.1f} GiB of memory touched and freed in each loader's "
            "process right before its clock starts"
        )
    )
    markdown = []
    for group in groups:
        load = " at the start, ".join(f"{x:.2f}" for x in group.load) + " at the end"
        size_text = f"{model_bytes / GiB:.2f} GiB model in {len(shards)} shards"
        if group.section == "warm":
            title = f"Warm: {size_text} in the cache and the page cache"
            note = f"Loaders on CPUs {args.warm_cpus}; one untimed pass first; {method}"
        else:
            where = (
                "rclone serve s3 on loopback"
                if group.origin == "fast"
                else f"rclone serve s3 behind throttle.py: {args.rate / 1e6:g} MB/s per "
                f"connection, {args.delay * 1000:g} ms to each first byte"
            )
            title = f"Cold, {group.origin} origin: {size_text} from {where}"
            note = (
                f"Origin on CPUs {args.server_cpus}, serving from memory; loaders on CPUs "
                f"{args.client_cpus}; page cache dropped and the cache empty before each run; "
                f"{method}"
            )
        note += f"; 1-minute load average {load}."
        markdown.append(table(title, list(group.results.values()), model_bytes, note))
    text = "\n".join(markdown)
    (args.out / "load.md").write_text(text)
    (args.out / "load.json").write_text(
        json.dumps(
            {
                "size": model_bytes,
                "shards": len(shards),
                "runs": args.runs,
                "groups": [
                    {
                        "section": g.section,
                        "origin": g.origin,
                        "load": g.load,
                        "results": [r.__dict__ for r in g.results.values()],
                    }
                    for g in groups
                ],
            },
            indent=2,
            default=str,
        )
    )
    print("\n" + text)
    print(f"wrote {args.out / 'load.md'} and {args.out / 'load.json'}")
    return 0


def _run_group(
    args: argparse.Namespace,
    group: Group,
    stack: contextlib.ExitStack,
    origin: Origin,
    work: Path,
    digests_path: Path,
    shards: list[str],
    files: list[Path],
    prefault_bytes: int,
) -> None:
    """Every run of one group's tools, round robin; a warm group prepares its cache."""
    env = client_env(origin)
    warm_cache = work / "warm-cache"
    node_cache = work / "node-cache"
    model_dir = Path("/nonexistent")
    endpoint = None
    if group.section == "warm":
        url = origin.url(BUCKET, PREFIX)
        for cache in (warm_cache, node_cache):
            shutil.rmtree(cache, ignore_errors=True)
            _cachefs(env, "-m", "cachefs.cli", "--cache-dir", str(cache), "prefetch", url)
        model_dir = Path(
            _cachefs(
                env,
                "-c",
                "import sys; from cachefs.loaders import local_model_dir; "
                "print(local_model_dir(sys.argv[1], storage_options={'cache_dir': sys.argv[2]}))",
                "cachefs::" + url,
                str(node_cache),
            ).splitlines()[-1]
        )
        if any("(node)" in name for name in group.results):
            socket = work / "node.sock"
            node = start_node(node_cache, socket, env, args.server_cpus, work / "node.log")
            stack.callback(node.wait, timeout=30)
            stack.callback(node.terminate)
            endpoint = f"unix://{socket}"
    tools = {t.name: t for t in TOOLS}
    run_env = {**env, "LOAD_BENCH_PREFAULT": str(prefault_bytes)}
    group.load.append(os.getloadavg()[0])
    print(f"{group.section}, {group.origin} origin: load average {group.load[0]:.2f}", flush=True)
    warm = group.section == "warm"
    for run in range(args.runs + warm):
        untimed = warm and run == 0  # first warm pass: caches, the node's checks
        for result in group.results.values():
            tool = tools[result.tool]
            if result.error:
                continue
            scratch = work / "scratch"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            ctx = Context(origin, digests_path, warm_cache, model_dir, shards, scratch, endpoint)
            command = tool.argv(ctx)
            if command is None:
                result.error = "not available"
                continue
            if result.tree is not None:  # python -c SNIPPET ARGS, with cachefs from the tree
                command = cachefs_argv(result.tree, "-c", *command[2:])
            if warm:
                for path in [
                    *model_dir.glob("*.safetensors"),
                    *warm_cache.glob("v1/objects/*/*/data"),
                ]:
                    read_file(path)
            else:
                drop_caches()
                for path in files:
                    read_file(path)  # the origin serves from memory, as a network would
                warm_etags(origin, [(BUCKET, PREFIX + f.name) for f in files])
            cpus = args.warm_cpus if warm else args.client_cpus
            try:
                doc = run_one(command, cpus, run_env, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result.error = str(exc)
                print(f"  {group.section} {tool.name}: {result.error}", flush=True)
                continue
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            label = "untimed" if untimed else f"run {run + (not warm)}"
            print(
                f"  {group.origin:9} {label:8} {result.name:56} {doc['seconds']:.3f} s "
                f"{doc['bytes'] / 1e9 / doc['seconds']:.2f} GB/s, CPU {doc['cpu']:.2f} s, load "
                f"{os.getloadavg()[0]:.2f}",
                flush=True,
            )
            if not untimed:
                result.seconds.append(float(doc["seconds"]))
                result.cpu.append(float(doc["cpu"]))
                if doc.get("first_tensor") is not None:
                    result.first_tensor.append(float(doc["first_tensor"]))


if __name__ == "__main__":
    sys.exit(main())
