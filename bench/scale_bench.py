"""A node over a cache of 100 000 objects: start-up time, RSS, ``cachefs ls`` and
``cachefs status``.

    python bench/scale_bench.py [--objects 100000] [--runs 3] [--work DIR] [--out DIR]

The cache directory is written once through the store's own writer (``Store.place``
then ``Store.write_block`` and ``Store.verify_digest``), so the files are exactly
what a node writes: each object one small block (``--object-size``, default 4 KiB),
complete, with its origin's crc32 digest checked and recorded, under made-up S3 URLs
(nothing is fetched). Then, ``--runs`` times, alternating with a node over an empty
cache (the fixed cost of the interpreter and the imports):

- **start-up**: ``cachefs node --cache-dir DIR --socket SOCK`` is started as a
  subprocess and the standard gRPC health service is polled on its socket until it
  answers SERVING; the time from the start of the process to that answer;
- **RSS**: the node's resident memory once serving (``VmRSS``), its peak so far
  (``VmHWM``), and its RSS after the client commands below;
- **ls / status**: ``cachefs ls --json`` and ``cachefs status --json`` against that
  node (``--endpoint unix://SOCK``), wall time of each subprocess, and whether it
  succeeded (the entries ``ls`` printed, or the reason it failed);
- **embedded**: the same two commands without a node (``--cache-dir DIR``), which open
  the store in the command's own process.

With ``--cold`` the page cache is dropped (``/proc/sys/vm/drop_caches``, as root)
before each run, so the node reads the cache directory from the disk: a host's
first start after a reboot (the client commands after it find it warm again). The
node is stopped with SIGTERM after each run. Each run also reports the CPU that
other processes used meanwhile (from /proc/stat): the timings are comparable only
on a quiet machine. Tables and JSON go to ``--out`` (``scale.md``, ``scale.json``),
with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
MiB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU-seconds all CPUs have spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def _process_seconds(pid: int) -> float:
    """User + system CPU-seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of process ``pid``, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found


# -- the cache -------------------------------------------------------------------


def populate(root: Path, count: int, size: int) -> float:
    """``count`` complete objects of ``size`` bytes in a disk tier at ``root``, written
    through the store; the seconds it took."""
    from cachefs.node.config import TierConfig
    from cachefs.node.layout import Digest, ObjectHeader
    from cachefs.node.store import Store
    from cachefs.urls import object_id, parse_url

    started = time.perf_counter()
    store = Store([TierConfig("disk", root, "disk", 100 * count * (size + 8192))])
    tier = store.tiers[0]
    payload = bytearray(os.urandom(size))
    for i in range(count):
        payload[:8] = i.to_bytes(8, "little")  # every object different bytes
        url = parse_url(f"s3://bench-models/model-{i // 1000:03d}/shard-{i:06d}.bin").canonical
        version = f'"{i:032x}"'
        digest = Digest("crc32", f"{zlib.crc32(payload):08x}")
        header = ObjectHeader(object_id(url, version), url, version, size, size, digest)
        obj = store.place(header, tier.name)
        if obj is None or not store.write_block(obj, 0, memoryview(payload)):
            raise SystemExit(f"object {i} could not be cached: raise the quota")
        if not store.verify_digest(obj):
            raise SystemExit(f"object {i} failed its digest")
        if (i + 1) % 10_000 == 0:
            print(f"  {i + 1:,} objects written", flush=True)
    if len(store.objects()) != count:
        raise SystemExit(f"{len(store.objects())} objects in the store, not {count}")
    return time.perf_counter() - started


# -- one run ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env.pop("PYTHONPATH", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cachefs.cli", *args]


def _healthy(socket: Path) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not socket.exists():
        return False
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _command(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a client command; its wall time, exit status and output size or error."""
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir()
    )
    seconds = time.perf_counter() - started
    lines = done.stdout.splitlines()
    error = done.stderr.strip().splitlines()[-1] if done.returncode and done.stderr else ""
    return {"seconds": seconds, "rc": done.returncode, "lines": len(lines), "error": error}


def run_once(cache: Path, work: Path, timeout: float) -> dict[str, Any]:
    """Start a node on ``cache``, measure it and its clients, stop it."""
    socket = work / "node.sock"
    busy, own = _busy_seconds(), _process_seconds(os.getpid())
    started = time.perf_counter()
    node = subprocess.Popen(
        _cli("node", "--cache-dir", str(cache), "--socket", str(socket)),
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tempfile.gettempdir(),
        start_new_session=True,
    )
    try:
        deadline = started + timeout
        while not _healthy(socket):
            if node.poll() is not None:
                raise SystemExit(f"the node exited with {node.returncode}: {node.stderr.read()}")
            if time.perf_counter() > deadline:
                raise SystemExit(f"the node did not serve within {timeout} s")
            time.sleep(0.02)
        startup = time.perf_counter() - started
        node_cpu = _process_seconds(node.pid)
        own = _process_seconds(os.getpid()) - own  # polling the health service
        others = max(_busy_seconds() - busy - node_cpu - own, 0.0) / startup
        serving = _memory(node.pid)
        endpoint = f"unix://{socket}"
        ls = _command(_cli("ls", "--endpoint", endpoint, "--json"), timeout)
        status = _command(_cli("status", "--endpoint", endpoint, "--json"), timeout)
        after = _memory(node.pid)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        socket.unlink(missing_ok=True)
    embedded_ls = _command(_cli("--cache-dir", str(cache), "ls", "--json"), timeout)
    embedded_status = _command(_cli("--cache-dir", str(cache), "status", "--json"), timeout)
    return {
        "startup": startup,
        "startup_cpu": node_cpu,
        "others_cpus": others,
        "rss_serving": serving["VmRSS"],
        "rss_peak": serving["VmHWM"],
        "rss_after": after["VmRSS"],
        "ls": ls,
        "status": status,
        "embedded_ls": embedded_ls,
        "embedded_status": embedded_status,
    }


def drop_page_cache() -> None:
    """Write dirty pages out, then drop the page cache, dentries and inodes."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root to drop the page cache: {exc}") from exc


# -- the report ------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _command_cell(runs: list[dict[str, Any]], key: str) -> str:
    results = [r[key] for r in runs]
    seconds = statistics.median(r["seconds"] for r in results)
    failed = [r for r in results if r["rc"] != 0]
    if failed:
        return f"{seconds:.2f} (failed: {failed[0]['error'][:120]})"
    return f"{seconds:.2f} ({results[0]['lines']:,} lines)"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    rows = [
        "| cache | start-up to serving: s (runs) | node CPU-s | RSS serving / peak / "
        "after ls: MiB | `ls` via node: s | `status` via node: s | `ls` embedded: s "
        "| `status` embedded: s | others' CPUs (max) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, runs in results.items():
        startups = ", ".join(f"{r['startup']:.2f}" for r in runs)
        rss = (
            f"{_median(runs, 'rss_serving') / MiB:.0f} / {_median(runs, 'rss_peak') / MiB:.0f}"
            f" / {_median(runs, 'rss_after') / MiB:.0f}"
        )
        rows.append(
            f"| {name} | {_median(runs, 'startup'):.2f} ({startups}) "
            f"| {_median(runs, 'startup_cpu'):.2f} | {rss} "
            f"| {_command_cell(runs, 'ls')} | {_command_cell(runs, 'status')} "
            f"| {_command_cell(runs, 'embedded_ls')} | {_command_cell(runs, 'embedded_status')} "
            f"| {max(r['others_cpus'] for r in runs):.2f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000, help="objects in the cache")
    parser.add_argument("--object-size", type=int, default=4096, help="bytes per object")
    parser.add_argument("--runs", type=int, default=3, help="runs per cache (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument(
        "--work", type=Path, help="scratch directory, kept (and its cache reused) when given"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per step")
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before each run (root)"
    )
    args = parser.parse_args(argv)
    command = shlex.join(
        ["python", "bench/scale_bench.py", *(sys.argv[1:] if argv is None else argv)]
    )

    work = args.work or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    full = work / f"cache-{args.objects}x{args.object_size}"
    empty = work / "cache-empty"
    caches = {"empty": empty, f"{args.objects:,} objects": full}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in caches}
    populated = None
    try:
        if not (full / "v1" / "objects").is_dir():
            print(f"writing {args.objects:,} objects under {full}", flush=True)
            staging = full.with_name(full.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            populated = populate(staging, args.objects, args.object_size)
            staging.rename(full)
            print(f"written in {populated:.1f} s", flush=True)
        for run in range(1, args.runs + 1):
            for name, cache in caches.items():  # alternately: the same conditions
                if args.cold:
                    drop_page_cache()
                result = run_once(cache, work, args.timeout)
                results[name].append(result)
                print(
                    f"run {run} {name}: start-up {result['startup']:.2f} s, "
                    f"RSS {result['rss_serving'] / MiB:.0f} MiB, ls {result['ls']['seconds']:.2f} s"
                    f" (rc {result['ls']['rc']}), status {result['status']['seconds']:.2f} s",
                    flush=True,
                )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    text = f"Command: `{command}`\n\n" + table(results)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(text + "\n")
    record = {
        "command": command,
        "args": {k: str(v) for k, v in vars(args).items()},
        "populate_seconds": populated,
        "results": results,
    }
    (args.out / "scale.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
