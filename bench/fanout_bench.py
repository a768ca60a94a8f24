"""Fan-out: a model onto 1, 2, 4 and 8 nodes, as a cluster and each node alone.

    python bench/fanout_bench.py [--size 1GiB] [--nodes 1 2 4 8] [--modes cluster alone]
                                 [--runs 2] [--rate 50MB] [--delay 0.03]
                                 [--origin-cpus 0] [--node-cpus 1] [--plot bench/fanout.png]
    python bench/fanout_bench.py --check-proxy     # what the throttled origin sustains
    python bench/fanout_bench.py --report bench/out/fanout.json   # tables and plot again

The origin is ``rclone serve s3`` behind ``throttle.py``, a proxy that holds the
first byte of each response for ``--delay`` seconds and paces each connection to
``--rate``, as object storage does. The model is one prefix of random files (four
shards and the small files beside them). For each N, N real ``cachefs node``
processes listen on 127.0.0.1 .. 127.0.0.N with fresh cache directories, and

* ``cluster``: the nodes form a static cluster; node 1 runs a cluster prefetch of
  the prefix (``NodeClient.prefetch([url], cluster=True)``), which ends when every
  node holds the model;
* ``alone``: the nodes know nothing of each other (what a per-node cache does by
  default); all N prefetch the prefix at once, and the run ends with the last.

Timed: the prefetch calls. Counted at the proxy: the bytes the origin sent. After
the clock stops every node's copy is checked (every object complete, spot checks of
its bytes against the source). See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from origins import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    Origin,
    free_port,
    pinned,
    read_through,
    serve_s3,
    warm_etags,
)
from prefetch_bench import Machine, parse_size, read_file, wait_for_quiet
from throttle import parse_rate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cachefs.client import NodeClient  # noqa: E402  (after the repository is on the path)

BUCKET = "models"
PREFIX = "model/"
WARMUP_KEY = "warmup/warmup.bin"  # a tiny object each run's nodes prefetch untimed
WARMUP_SIZE = 4096
TOKEN = "fanout-bench-token"
MiB = 2**20
ORIGIN_TARGET = 1.05  # cluster: origin bytes <= this x the model, at every N
WALL_TARGET = 2.0  # cluster: wall time at the largest N <= this x at N=1
QUIET_LOAD = 0.8
READY_TIMEOUT = 120.0
SPOT_CHECKS = 4  # random 1 MiB ranges compared per file and node (plus the last bytes)
_HZ = os.sysconf("SC_CLK_TCK")


# --- the model --------------------------------------------------------------------


def model_files(size: int) -> dict[str, int]:
    """Key -> size: four safetensors shards and the small files, ``size`` bytes in all."""
    small = {
        "config.json": 1024,
        "generation_config.json": 256,
        "tokenizer_config.json": 4096,
        "tokenizer.json": min(9 * MiB, size // 64),
    }
    rest = size - sum(small.values())
    if rest < 4 * MiB:
        raise ValueError(f"--size {size} is too small for a model of four shards")
    shard = rest // 4
    files = {
        f"{PREFIX}model-{i:05d}-of-00004.safetensors": shard + (rest - 4 * shard if i == 4 else 0)
        for i in range(1, 5)
    }
    files.update({PREFIX + name: n for name, n in small.items()})
    return files


def write_random(path: Path, size: int) -> None:
    """``size`` random bytes at ``path`` (nothing else beside it: the prefix is the model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(64 * MiB, left))
            out.write(chunk)
            left -= len(chunk)


# --- the throttled origin ---------------------------------------------------------


class Proxy:
    """``throttle.py`` as a child process, asked for its counters over stdin/stdout."""

    def __init__(
        self, upstream: str, rate: float, delay: float, cpus: str | None, log: Path
    ) -> None:
        argv = [
            sys.executable,
            str(Path(__file__).with_name("throttle.py")),
            "--upstream",
            upstream,
            "--rate",
            str(rate),
            "--delay",
            str(delay),
        ]
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            pinned(argv, cpus),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        first = json.loads(self._readline())
        self.address: str = first["address"]
        self.splice: bool = first["splice"]
        self.endpoint = f"http://{self.address}"

    def _readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"throttle.py exited with {self.process.wait()}")
        return line

    def stats(self, reset: bool = False) -> dict[str, int]:
        assert self.process.stdin is not None
        self.process.stdin.write("reset\n" if reset else "stats\n")
        self.process.stdin.flush()
        return json.loads(self._readline())

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def throttled_origin(
    root: Path, files: Sequence[str], rate: float, delay: float, cpus: str | None, work: Path
) -> Iterator[tuple[Origin, Proxy]]:
    """rclone over ``root`` (ETags computed, first GET done) behind the proxy."""
    with serve_s3(root, cpus=cpus, log_dir=work) as origin:
        hashing = warm_etags(origin, [(BUCKET, key) for key in files])
        largest = max(files, key=lambda key: (root / BUCKET / key).stat().st_size)
        first = read_through(origin, BUCKET, largest)
        print(f"origin {origin.endpoint}: ETags {hashing:.2f} s, first GET {first:.2f} s")
        upstream = origin.endpoint.removeprefix("http://")
        proxy = Proxy(upstream, rate, delay, cpus, work / "throttle.log")
        try:
            print(
                f"throttled origin {proxy.endpoint}: {rate / 1e6:g} MB/s per connection, "
                f"{delay * 1000:g} ms to first byte, {'splice' if proxy.splice else 'copy'}",
                flush=True,
            )
            yield origin, proxy
        finally:
            proxy.stop()


# --- nodes ------------------------------------------------------------------------


@dataclass
class Node:
    index: int
    process: subprocess.Popen[bytes]
    socket_path: Path
    log: Path
    cache: Path

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    def wait_ready(self, deadline: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"node {self.index + 1} exited with {self.process.returncode}: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            with contextlib.suppress(OSError):
                if '"serving"' in self.log.read_text(errors="replace"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.index + 1} not serving after {READY_TIMEOUT} s")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def node_env(proxy: Proxy, origin: Origin, work: Path) -> dict[str, str]:
    """The parent's environment without cachefs/AWS settings; the proxy as S3 endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "AWS_"))}
    env.update(origin.env())
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL"):
        env[name] = proxy.endpoint
    env["CACHEFS_TOKEN"] = TOKEN
    env["XDG_CACHE_HOME"] = str(work / "xdg-cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def node_cpus(spec: str | None, index: int) -> str | None:
    """The CPUs of node ``index``: ``0,1`` for every node, ``0/1`` for one list each in turn."""
    if not spec:
        return None
    lists = spec.split("/")
    return lists[index % len(lists)]


def start_nodes(
    count: int, mode: str, run_dir: Path, cache_root: Path, env: dict[str, str], cpus: str | None
) -> list[Node]:
    """``count`` nodes on 127.0.0.1 .. 127.0.0.N, all started before any is waited for."""
    addresses = [f"127.0.0.{i + 1}:{free_port(f'127.0.0.{i + 1}')}" for i in range(count)]
    nodes: list[Node] = []
    try:
        for i, address in enumerate(addresses):
            cache = cache_root / f"cache-{i + 1}"
            config: dict[str, Any] = {"cache_dir": str(cache)}
            if mode == "cluster":
                config["cluster"] = {"membership": "static", "peers": addresses}
            config_path = run_dir / f"node-{i + 1}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            socket_path = run_dir / f"node-{i + 1}.sock"
            argv = [
                sys.executable,
                "-m",
                "cachefs.cli",
                "node",
                "--config",
                str(config_path),
                "--socket",
                str(socket_path),
                *(["--address", address] if mode == "cluster" else []),
            ]
            log = run_dir / f"node-{i + 1}.log"
            with log.open("wb") as log_file:
                process = subprocess.Popen(
                    pinned(argv, node_cpus(cpus, i)),
                    env=env,
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            nodes.append(Node(i, process, socket_path, log, cache))
        deadline = time.monotonic() + READY_TIMEOUT
        for node in nodes:
            node.wait_ready(deadline)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


# --- CPU accounting ---------------------------------------------------------------


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _HZ


def _cpu_lines() -> dict[str, tuple[float, float]]:
    """Per CPU (and ``cpu``, all of them): (busy, total) seconds since boot."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *values = line.split()
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])
        busy = user + nice + system + irq + softirq + steal
        out[name] = (busy / _HZ, (busy + idle + iowait) / _HZ)
    return out


def _busy(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The busy share of a CPU between two ``_cpu_lines`` samples."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else float("nan")


def _all_processes() -> dict[int, tuple[str, float]]:
    """Every process (kernel threads too): pid -> (name, CPU seconds)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _HZ)
    return out


class CpuMeter:
    """CPU seconds per role over a run, each CPU's busy share, and everyone else's."""

    def __init__(self, roles: dict[str, Sequence[int]]) -> None:
        self.roles = roles
        self.ours = {pid for pids in roles.values() for pid in pids}
        self.start = self._sample()
        self.start_all = _all_processes()

    def _sample(self) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:
        per_role = {role: [_process_cpu(pid) for pid in pids] for role, pids in self.roles.items()}
        return per_role, _cpu_lines()

    def finish(self) -> dict[str, Any]:
        roles, cpus = self._sample()
        start_roles, start_cpus = self.start
        used = {
            role: [b - a for a, b in zip(start_roles[role], roles[role], strict=True)]
            for role in roles
        }
        busy = {name: _busy(start_cpus.get(name, now), now) for name, now in cpus.items()}
        all_busy = cpus["cpu"][0] - start_cpus["cpu"][0]
        ours = sum(sum(v) for v in used.values())
        others = []
        for pid, (name, cpu) in _all_processes().items():
            if pid not in self.ours and cpu - self.start_all.get(pid, (name, 0.0))[1] >= 0.1:
                others.append((cpu - self.start_all.get(pid, (name, 0.0))[1], name))
        top = [f"{name} {cpu:.1f}" for cpu, name in sorted(others, reverse=True)[:4]]
        return {"seconds": used, "busy": busy, "other": max(all_busy - ours, 0.0), "top": top}


# --- one configuration ------------------------------------------------------------


@dataclass
class Result:
    nodes: int
    mode: str
    seconds: float = float("nan")
    origin_bytes: int = 0  # proxy: upstream -> nodes, headers included
    origin_requests: int = 0  # responses through the proxy
    origin_connections: int = 0
    peak_connections: int = 0
    node_origin_bytes: list[int] = field(default_factory=list)  # each node's own count
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_busy: dict[str, float] = field(default_factory=dict)
    other_cpu_seconds: float = float("nan")
    load_before: float = float("nan")
    prefault_bytes: int = 0
    stat_misses: int = 0  # (node, file) whose stat did not see the prefetched copy
    top_others: list[str] = field(default_factory=list)  # the busiest other processes
    all_seconds: list[float] = field(default_factory=list)  # every run's (summaries)
    error: str | None = None

    def ratio(self, model: int) -> float:
        return self.origin_bytes / model

    def delivered_mbps(self, model: int) -> float:
        return self.nodes * model / 1e6 / self.seconds


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    root: Path
    files: dict[str, int]
    origin: Origin
    proxy: Proxy
    machine: Machine

    @property
    def model_size(self) -> int:
        return sum(self.files.values())

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{PREFIX}"

    def run(self, count: int, mode: str) -> Result:
        result = Result(count, mode)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{count}-", dir=self.work))
        cache_root = Path(tempfile.mkdtemp(prefix=f"{mode}-{count}-", dir=self.args.cache_root))
        env = node_env(self.proxy, self.origin, self.work)
        nodes: list[Node] = []
        try:
            nodes = start_nodes(count, mode, run_dir, cache_root, env, self.args.node_cpus)
            self._warm_up(nodes, mode)
            self.machine.drop_caches()
            for key in self.files:  # the origin serves from memory, as object storage's
                read_file(self.root / BUCKET / key)  # front ends do for a hot model
            result.prefault_bytes = self._prefault(count)
            self.proxy.stats(reset=True)
            result.load_before = os.getloadavg()[0]
            meter = CpuMeter(
                {
                    "nodes": [n.process.pid for n in nodes],
                    "rclone": [self.origin.process.pid],
                    "proxy": [self.proxy.process.pid],
                    "driver": [os.getpid()],
                }
            )
            start = time.perf_counter()
            self._prefetch(nodes, mode)
            result.seconds = time.perf_counter() - start
            usage = meter.finish()
            result.cpu_seconds, result.cpu_busy = usage["seconds"], usage["busy"]
            result.other_cpu_seconds = usage["other"]
            result.top_others = usage["top"]
            stats = self.proxy.stats()
            result.origin_bytes = stats["down"]
            result.origin_requests = stats["responses"]
            result.origin_connections = stats["connections"]
            result.peak_connections = stats["peak_active"]
            statuses = [NodeClient(n.endpoint).status() for n in nodes]
            result.node_origin_bytes = [s.fetched_bytes for s in statuses]
            result.stat_misses = self._verify(nodes)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  N={count} {mode}: {result.error}", flush=True)
        finally:
            for node in nodes:
                node.kill()
            shutil.rmtree(cache_root, ignore_errors=True)
            if not self.args.keep_logs:
                shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def _warm_up(self, nodes: Sequence[Node], mode: str) -> None:
        """Untimed: each node's lazy imports, origin client and channels, on a tiny object."""
        url = f"s3://{BUCKET}/{WARMUP_KEY}"
        if mode == "cluster":
            NodeClient(nodes[0].endpoint).prefetch([url], cluster=True)
        else:
            for node in nodes:
                NodeClient(node.endpoint).prefetch([url])

    def _prefault(self, count: int) -> int:
        """Touch and free the memory the run will fill (see bench/README.md, *Memory*)."""
        if self.args.no_prefault:
            return 0
        want = int((count + 0.25) * self.model_size)
        available = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
        nbytes = max(0, min(want, available - 4 * 2**30))
        self.machine.prefault_bytes = nbytes
        self.machine.prefault()
        return nbytes

    def _prefetch(self, nodes: Sequence[Node], mode: str) -> None:
        if mode == "cluster":
            status = NodeClient(nodes[0].endpoint).prefetch([self.url], cluster=True)
            if status.state != "succeeded" or status.nodes_done != len(nodes):
                raise RuntimeError(
                    f"cluster prefetch {status.state}, {status.nodes_done}/{len(nodes)} nodes: "
                    f"{status.error}"
                )
            return
        barrier = threading.Barrier(len(nodes))
        errors: list[str] = []

        def alone(node: Node) -> None:
            client = NodeClient(node.endpoint)
            client.status()  # the channel is open before the start line
            barrier.wait()
            try:
                status = client.prefetch([self.url])
                if status.state != "succeeded":
                    errors.append(f"node {node.index + 1}: {status.state} {status.error}")
            except Exception as exc:
                errors.append(f"node {node.index + 1}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=alone, args=(n,)) for n in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError("; ".join(errors))

    def _verify(self, nodes: Sequence[Node]) -> int:
        """Every node: every file complete, its size right, spot checks of its bytes.

        The data file is found from the listed entry's object id (the store's layout),
        not from a stat: a stat asks the origin for the version again. Returns how
        many (node, file) stats did not find the complete copy.
        """
        rng = random.Random(0)
        stat_misses = 0
        for node in nodes:
            client = NodeClient(node.endpoint)
            tier = Path(client.status().tiers[0].path)
            cached = {e.url: e for e in client.cached()}
            for key, size in self.files.items():
                url = f"s3://{BUCKET}/{key}"
                entry = cached.get(url)
                if entry is None or not entry.complete or entry.size != size:
                    raise RuntimeError(f"node {node.index + 1}: {url} not complete: {entry}")
                stat_misses += not client.stat(url).complete
                data = tier / "v1" / "objects" / entry.id[:2] / entry.id / "data"
                offsets = [max(size - MiB, 0)]
                offsets += [rng.randrange(max(size - MiB, 1)) for _ in range(SPOT_CHECKS)]
                with data.open("rb") as copy, (self.root / BUCKET / key).open("rb") as source:
                    for offset in offsets:
                        copy.seek(offset)
                        source.seek(offset)
                        if copy.read(MiB) != source.read(MiB):
                            raise RuntimeError(
                                f"node {node.index + 1}: {url} differs at offset {offset}"
                            )
        return stat_misses


# --- proxy capacity ---------------------------------------------------------------

# Ranged GETs of 8 MiB through N keep-alive connections for a few seconds; prints
# the bytes read. Run in several processes so the load generator's GIL is no limit.
LOADGEN = """
import http.client, sys, threading, time
port, host, path, size, conns, seconds = sys.argv[1], sys.argv[2], sys.argv[3], \
    int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
block = 8 * 2**20
total, lock = [0], threading.Lock()
stop = time.monotonic() + seconds
def worker(i):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
    buf = memoryview(bytearray(2**20))
    offset, got = (i * block * 7) % (size - block), 0
    while time.monotonic() < stop:
        conn.request("GET", path, headers={"Range": f"bytes={offset}-{offset + block - 1}",
                                           "Host": host})
        resp = conn.getresponse()
        while n := resp.readinto(buf):
            got += n
        offset = (offset + 13 * block) % (size - block)
    with lock:
        total[0] += got
threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(total[0])
"""


def check_proxy(bench_args: argparse.Namespace, origin: Origin, proxy: Proxy, key: str) -> str:
    """Aggregate MB/s of 8 MiB ranged GETs: rclone directly, and through the proxy."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=origin.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600
    )
    host_path = url.removeprefix("http://")
    host, _, path = host_path.partition("/")
    size = (origin.root / BUCKET / key).stat().st_size
    seconds = bench_args.check_seconds
    lines = [
        "| path | connections | aggregate MB/s | per connection MB/s | ideal MB/s | "
        "rclone cores | proxy cores | CPU busy |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    per_conn_ideal = (
        8 * MiB / (bench_args.delay + 8 * MiB / bench_args.rate) / 1e6 if bench_args.rate else 0
    )
    cases = [("rclone direct", origin.endpoint, 16)] + [
        ("throttled proxy", proxy.endpoint, c) for c in bench_args.check_connections
    ]
    for label, endpoint, conns in cases:
        port = endpoint.rsplit(":", 1)[1]
        procs = min(4, conns)
        shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        before = _cpu_lines()
        rclone0, proxy0 = _process_cpu(origin.process.pid), _process_cpu(proxy.process.pid)
        start = time.perf_counter()
        children = [
            subprocess.Popen(
                pinned(
                    [
                        sys.executable,
                        "-c",
                        textwrap.dedent(LOADGEN),
                        port,
                        host,
                        "/" + path,
                        str(size),
                        str(share),
                        str(seconds),
                    ],
                    node_cpus(bench_args.node_cpus, 0),
                ),
                stdout=subprocess.PIPE,
                text=True,
            )
            for share in shares
        ]
        total = sum(int(child.communicate()[0].strip() or 0) for child in children)
        elapsed = time.perf_counter() - start
        after = _cpu_lines()
        rclone = (_process_cpu(origin.process.pid) - rclone0) / elapsed
        proxy_cores = (_process_cpu(proxy.process.pid) - proxy0) / elapsed
        busy = ", ".join(
            f"{name} {100 * _busy(before[name], after[name]):.0f}%"
            for name in sorted(after)
            if name != "cpu"
        )
        mbps = total / 1e6 / elapsed
        ideal = (
            f"{per_conn_ideal * conns:.0f}" if label != "rclone direct" and per_conn_ideal else "-"
        )
        lines.append(
            f"| {label} | {conns} | {mbps:.0f} | {mbps / conns:.1f} | {ideal} | "
            f"{rclone:.2f} | {proxy_cores:.2f} | {busy} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# --- report -----------------------------------------------------------------------


def human(size: float) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size:.0f} B"


def table(results: Sequence[Result], model: int) -> str:
    lines = [
        "| N | mode | wall s | origin bytes | origin / model | delivered MB/s | "
        "origin GETs | peak origin connections |",
        "|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.nodes} | {r.mode} | error: {r.error.replace('|', '/')} ||||||")
            continue
        wall = f"{r.seconds:.2f}"
        if len(r.all_seconds) > 1:
            wall += f" ({min(r.all_seconds):.2f}-{max(r.all_seconds):.2f})"
        lines.append(
            f"| {r.nodes} | {r.mode} | {wall} | {r.origin_bytes:,} | "
            f"{r.ratio(model):.3f}x | {r.delivered_mbps(model):.0f} | {r.origin_requests} | "
            f"{r.peak_connections} |"
        )
    return "\n".join(lines) + "\n"


def cpu_table(results: Sequence[Result]) -> str:
    cpus = sorted({name for r in results for name in r.cpu_busy if name != "cpu"})
    lines = [
        "| N | mode | nodes CPU s (busiest node) | rclone CPU s | proxy CPU s | driver CPU s | "
        "others CPU s | busiest others | " + " | ".join(f"{c} busy" for c in cpus) + " |",
        "|--:|---|--:|--:|--:|--:|--:|---|" + "--:|" * len(cpus),
    ]
    for r in results:
        if r.error or not r.cpu_seconds:
            continue
        nodes = r.cpu_seconds["nodes"]
        busy = " | ".join(f"{100 * r.cpu_busy.get(c, float('nan')):.0f}%" for c in cpus)
        lines.append(
            f"| {r.nodes} | {r.mode} | {sum(nodes):.1f} ({max(nodes):.1f}) | "
            f"{sum(r.cpu_seconds['rclone']):.1f} | {sum(r.cpu_seconds['proxy']):.1f} | "
            f"{sum(r.cpu_seconds['driver']):.1f} | {r.other_cpu_seconds:.1f} | "
            f"{', '.join(r.top_others[:3]) or '-'} | {busy} |"
        )
    return "\n".join(lines) + "\n"


def summarize(runs: Sequence[Result]) -> list[Result]:
    """One row per (N, mode): the run with the median wall time, every run's time kept."""
    groups: dict[tuple[int, str], list[Result]] = {}
    for r in runs:
        groups.setdefault((r.nodes, r.mode), []).append(r)
    rows = []
    for group in groups.values():
        good = sorted((r for r in group if not r.error), key=lambda r: r.seconds)
        if not good:
            rows.append(group[0])
            continue
        seconds = [r.seconds for r in good]
        middle = statistics.median(seconds)
        nearest = min(good, key=lambda r: abs(r.seconds - middle))
        row = Result(**{**asdict(nearest), "seconds": middle, "all_seconds": seconds})
        failed = len(group) - len(good)
        if failed:
            row.error = None
            row.top_others = [*row.top_others, f"{failed} run(s) failed"]
        rows.append(row)
    return rows


def verdicts(
    results: Sequence[Result], model: int, nfiles: int, runs: Sequence[Result]
) -> list[str]:
    """The targets, judged on the medians (wall time) and on every run (origin bytes)."""
    cluster = {r.nodes: r for r in results if r.mode == "cluster" and not r.error}
    lines = []
    if cluster:
        every = [r for r in runs if r.mode == "cluster" and not r.error]
        worst = max(every, key=lambda r: r.ratio(model))
        met = all(r.ratio(model) <= ORIGIN_TARGET for r in every)
        lines.append(
            f"Origin bytes, cluster: at most {worst.ratio(model):.3f}x the model "
            f"(N={worst.nodes}, over every run); "
            f"target <= {ORIGIN_TARGET}x at every N: {'met' if met else 'NOT met'}."
        )
        largest = max(cluster)
        if 1 in cluster and largest > 1:
            ratio = cluster[largest].seconds / cluster[1].seconds
            lines.append(
                f"Wall time, cluster: N={largest} {cluster[largest].seconds:.2f} s = {ratio:.2f}x "
                f"N=1 ({cluster[1].seconds:.2f} s); target <= {WALL_TARGET}x: "
                f"{'met' if ratio <= WALL_TARGET else 'NOT met'}."
            )
    for r in results:
        if r.error or not r.node_origin_bytes or r.mode != "cluster" or r.nodes < 2:
            continue
        lines.append(
            f"N={r.nodes} cluster: each node fetched {human(min(r.node_origin_bytes))} to "
            f"{human(max(r.node_origin_bytes))} of the model from the origin (nodes' own "
            "counts), the rest from its peers."
        )
    misses = [r for r in results if r.stat_misses]
    if misses:
        lines.append(
            "After the prefetch, a stat on the node did not find the complete copy for "
            + ", ".join(
                f"{r.stat_misses} of {r.nodes * nfiles} files (N={r.nodes} {r.mode})"
                for r in misses
            )
            + ": the version its HEAD reports differs from the one the prefetch listed."
        )
    return lines


def plot(path: Path, results: Sequence[Result], model: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wall, origin, cpu) = plt.subplots(1, 3, figsize=(14, 4.2))
    styles = {"cluster": ("tab:orange", "o"), "alone": ("tab:blue", "s")}
    labels = {"cluster": "cluster (cachefs)", "alone": "each node alone"}
    for mode, (color, marker) in styles.items():
        rows = sorted((r for r in results if r.mode == mode and not r.error), key=lambda r: r.nodes)
        if not rows:
            continue
        ns = [r.nodes for r in rows]
        wall.plot(ns, [r.seconds for r in rows], marker=marker, color=color, label=labels[mode])
        origin.plot(
            ns, [r.ratio(model) for r in rows], marker=marker, color=color, label=labels[mode]
        )
        with_cpu = [r for r in rows if r.cpu_seconds]
        cpu.plot(
            [r.nodes for r in with_cpu],
            [sum(r.cpu_seconds["nodes"]) for r in with_cpu],
            marker=marker,
            color=color,
            label=f"{labels[mode]}: all nodes",
        )
        cpu.plot(
            [r.nodes for r in with_cpu],
            [max(r.cpu_seconds["nodes"]) for r in with_cpu],
            marker=marker,
            color=color,
            linestyle=":",
            label=f"{labels[mode]}: busiest node",
        )
    one = next((r for r in results if r.mode == "cluster" and r.nodes == 1 and not r.error), None)
    if one is not None:
        wall.axhline(
            WALL_TARGET * one.seconds, color="gray", linestyle="--", label="goal: 2x cluster N=1"
        )
    origin.axhline(ORIGIN_TARGET, color="gray", linestyle="--", label=f"target {ORIGIN_TARGET}x")
    ns = sorted({r.nodes for r in results})
    for ax in (wall, origin, cpu):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("nodes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    wall.set_ylabel("wall time until every node holds the model (s)")
    wall.set_ylim(bottom=0)
    origin.set_ylabel("origin bytes / model size")
    origin.set_ylim(bottom=0)
    cpu.set_ylabel("CPU seconds of the nodes during the run")
    cpu.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fan-out of a model to N nodes: cluster prefetch against each node alone."
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="model size")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=["cluster", "alone"], default=None)
    parser.add_argument("--rate", type=parse_rate, default=50e6, help="per connection (50MB)")
    parser.add_argument("--delay", type=float, default=0.03, help="seconds to first byte")
    parser.add_argument("--origin-cpus", default="0", help="taskset CPUs of rclone and the proxy")
    parser.add_argument(
        "--node-cpus",
        default="1",
        help="taskset CPUs of the nodes and the driver; '0/1': node i gets list i mod 2",
    )
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--cache-root", type=Path, help="where cache directories go (--work)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--plot", type=Path, default=REPO / "bench" / "fanout.png")
    parser.add_argument("--runs", type=int, default=2, help="runs per configuration (2)")
    parser.add_argument(
        "--report", type=Path, help="only render the tables and plot of a fanout.json"
    )
    parser.add_argument("--no-prefault", action="store_true")
    parser.add_argument("--load-wait", type=float, default=600)
    parser.add_argument("--keep-logs", action="store_true", help="keep each run's node logs")
    parser.add_argument(
        "--check-proxy", action="store_true", help="measure the throttled origin instead"
    )
    parser.add_argument("--check-connections", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--check-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.report:
        return report(json.loads(args.report.read_text()), args.out, args.plot)
    for name in ("origin_cpus", "node_cpus"):
        setattr(args, name, getattr(args, name) or None)
    modes = args.modes or ["cluster", "alone"]
    if shutil.which("taskset") is None and (args.origin_cpus or args.node_cpus):
        parser.error("taskset not found (util-linux); or pass --origin-cpus '' --node-cpus ''")
    work = args.work or Path(tempfile.mkdtemp(prefix="cachefs-fanout-"))
    work.mkdir(parents=True, exist_ok=True)
    args.cache_root = args.cache_root or work
    args.cache_root.mkdir(parents=True, exist_ok=True)
    (work / "xdg-cache").mkdir(exist_ok=True)
    try:
        return _run(args, work, modes)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, modes: Sequence[str]) -> int:
    root = work / "origin"
    files = model_files(args.size)
    print(f"writing the model: {len(files)} files, {human(args.size)}", flush=True)
    shutil.rmtree(root / BUCKET / PREFIX, ignore_errors=True)  # another --size's files
    for key, size in {**files, WARMUP_KEY: WARMUP_SIZE}.items():
        write_random(root / BUCKET / key, size)
    keys = [*files, WARMUP_KEY]
    with throttled_origin(root, keys, args.rate, args.delay, args.origin_cpus, work) as (
        origin,
        proxy,
    ):
        if args.node_cpus:  # the driver (the user's prefetch calls) runs beside the nodes
            os.sched_setaffinity(0, _cpu_list(args.node_cpus.replace("/", ",")))
        if args.check_proxy:
            shard = next(iter(files))
            text = check_proxy(args, origin, proxy, shard)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "fanout-proxy.md").write_text(text)
            return 0
        if args.load_wait > 0:
            wait_for_quiet(QUIET_LOAD, args.load_wait)
        start_load = os.getloadavg()[0]
        machine = Machine(node_cpus(args.node_cpus, 0))
        bench = Bench(args, work, root, files, origin, proxy, machine)
        runs: list[Result] = []
        for run in range(args.runs):
            for count in args.nodes:
                for mode in modes:
                    print(f"run {run + 1}: N={count} {mode} ...", flush=True)
                    result = bench.run(count, mode)
                    runs.append(result)
                    if not result.error:
                        print(
                            f"  {result.seconds:.2f} s, origin {human(result.origin_bytes)} "
                            f"({result.ratio(bench.model_size):.3f}x), others' CPU "
                            f"{result.other_cpu_seconds:.1f} s ({', '.join(result.top_others)})",
                            flush=True,
                        )
    prefaults = sorted({r.prefault_bytes for r in runs})
    method = (
        f"Model {human(bench.model_size)} in {len(files)} files (random bytes), block size "
        f"8 MiB (default); origin rclone serve s3 behind a proxy pacing each connection to "
        f"{args.rate / 1e6:g} MB/s with {args.delay * 1000:g} ms to first byte; rclone and "
        f"proxy on CPUs {args.origin_cpus or 'any'}, nodes and driver on CPUs "
        f"{args.node_cpus or 'any'}; {args.runs} run(s) per configuration"
        + (
            " (median wall time, range in brackets; other columns from the run nearest the median)"
            if args.runs > 1
            else ""
        )
        + "; page cache "
        f"{'dropped' if machine.can_drop else 'NOT dropped'} before each run, the origin's "
        f"files then read back into it; memory pre-faulted: "
        f"{', '.join(human(p) for p in prefaults) or 'no'}; each node's copy verified after "
        "the clock (every object complete, the last MiB and "
        f"{SPOT_CHECKS} random MiB of every file compared with the source); 1-minute load "
        f"average {start_load:.2f} at the start (later runs raise it themselves: see others' "
        "CPU for what else ran)."
    )
    title = (
        f"Fan-out of a {human(bench.model_size)} model; origin {args.rate / 1e6:g} MB/s per "
        f"connection, {args.delay * 1000:g} ms to first byte; {os.cpu_count()} CPUs"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stored = {
        "model_bytes": bench.model_size,
        "files": files,
        "rate": args.rate,
        "delay": args.delay,
        "method": method,
        "title": title,
        "runs": [asdict(r) for r in runs],
    }
    (args.out / "fanout.json").write_text(json.dumps(stored, indent=2))
    return report(stored, args.out, args.plot)


def report(stored: dict[str, Any], out: Path, plot_path: Path) -> int:
    """Tables, verdicts and the plot from the runs ``fanout.json`` keeps."""
    runs = [Result(**r) for r in stored["runs"]]
    model, nfiles = stored["model_bytes"], len(stored["files"])
    results = summarize(runs)
    text = "\n".join(
        [
            table(results, model),
            *verdicts(results, model, nfiles, runs),
            "",
            "CPU during each run (seconds of CPU time; busy: share of each CPU's time):",
            "",
            cpu_table(results),
            stored["method"],
        ]
    )
    print("\n" + text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.md").write_text(text)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(plot_path, results, model, stored["title"])
    print(f"wrote {out / 'fanout.md'}, {out / 'fanout.json'}, {plot_path}")
    return 0 if all(not r.error for r in results) else 1


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


if __name__ == "__main__":
    sys.exit(main())
