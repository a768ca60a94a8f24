"""The store's index rebuild and eviction, against the code before the store's split.

    python bench/store_bench.py [--objects 100000] [--tier-objects 20000]
                                [--evictions 10000] [--runs 3]
                                [--python OLD_VENV/bin/python]

Two measurements, each in a fresh process per run:

- **rebuild**: ``--objects`` small objects (one 4 KiB block each, complete) are
  written once in the store's on-disk format with the layout helpers (data file,
  meta file with header and block record); a process then times ``Store(...)``
  opening that tier and reports its RSS before and after.
- **evict**: a tier of ``--tier-objects`` such objects, its quota exactly full, is
  opened untimed; then one reservation of ``--evictions`` objects' footprints is
  timed: it evicts that many least recently used objects (each renamed into the
  trash and deleted, as always).

With ``--python`` every run is made twice, alternately: by that interpreter, the
code before (``node.store``, imported with a working directory outside this
checkout), and by this one, the code here (``cachefs.node.store``). Both read the
same files: the format did not change. Each run reports the CPU that other
processes used meanwhile (from /proc/stat), since the timings are only comparable
on a quiet machine. Tables and JSON go to ``--out`` (``store.md``, ``store.json``).

The same file is the measuring process (``_measure``: an internal subcommand).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
MiB = 1024 * 1024
BLOCK = 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the measuring process -----------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _busy_seconds() -> float:
    """CPU-seconds all CPUs have spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(argv: Sequence[str]) -> int:
    """Run one measurement with the store named by ``--package``; print JSON."""
    parser = argparse.ArgumentParser(prog="store_bench.py _measure")
    parser.add_argument("what", choices=["rebuild", "evict"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--package", required=True, help="cachefs.node or node")
    parser.add_argument("--quota", type=int, required=True)
    parser.add_argument("--evictions", type=int, default=0)
    args = parser.parse_args(argv)
    store_module = __import__(f"{args.package}.store", fromlist=["Store"])
    config_module = __import__(f"{args.package}.config", fromlist=["TierConfig"])
    layout = __import__(f"{args.package}.layout", fromlist=["ObjectHeader"])
    tiers = [config_module.TierConfig("disk", args.root, "disk", args.quota)]

    load_before = os.getloadavg()[0]
    rss_before = _rss()
    if args.what == "rebuild":
        busy, own, started = _busy_seconds(), _own_seconds(), time.perf_counter()
        store = store_module.Store(tiers)
        seconds = time.perf_counter() - started
    else:
        store = store_module.Store(tiers)
        tier = store.tiers[0]
        header = layout.ObjectHeader("0" * 32, "file:///bench/protect", "v", BLOCK, BLOCK)
        protect = store_module.CachedObject(header=header, tier=tier)
        amount = args.evictions * header.footprint()
        busy, own, started = _busy_seconds(), _own_seconds(), time.perf_counter()
        if not store.reserve(tier, amount, protect):
            raise SystemExit("the reservation failed: nothing to evict")
        seconds = time.perf_counter() - started
        if tier.evictions != args.evictions:
            raise SystemExit(f"{tier.evictions} evictions, not {args.evictions}")
    own = _own_seconds() - own
    others = max(_busy_seconds() - busy - own, 0.0)
    result = {
        "what": args.what,
        "seconds": seconds,
        "objects": len(store.tiers[0].objects),
        "rss_before": rss_before,
        "rss_after": _rss(),
        "cpu_seconds": own,
        "others_cpus": others / seconds if seconds else 0.0,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    print(json.dumps(result))
    return 0


# -- the driver ----------------------------------------------------------------


def synthesise(root: Path, count: int) -> int:
    """``count`` complete one-block objects under the tier ``root``; their footprint.

    The store's format, written with its layout helpers: a sparse-capable data file
    of the object's size and a meta file holding the header and the block's record.
    """
    import xxhash

    from cachefs.node import layout
    from cachefs.node.layout import ObjectHeader
    from cachefs.urls import object_id

    data = os.urandom(BLOCK)
    record = layout.encode_block(0, xxhash.xxh3_64_intdigest(data))
    footprint = 0
    for i in range(count):
        url = f"file:///bench/objects/{i:07d}.bin"
        header = ObjectHeader(object_id(url, "v1"), url, "v1", BLOCK, BLOCK)
        directory = layout.object_dir(root, header.id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").write_bytes(data)
        (directory / "meta").write_bytes(layout.encode_header(header) + record)
        footprint = header.footprint()
    return footprint


def run_measurement(
    python: str, package: str, what: str, root: Path, quota: int, evictions: int, timeout: float
) -> dict[str, Any]:
    """One measurement in a fresh process of ``python`` (outside this checkout)."""
    argv = [python, str(SCRIPT), "_measure", what, str(root), "--package", package]
    argv += ["--quota", str(quota), "--evictions", str(evictions)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(
        argv, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "best": min(r["seconds"] for r in runs),
        "rss_mib": statistics.median(r["rss_after"] for r in runs) / MiB,
        "index_mib": statistics.median(r["rss_after"] - r["rss_before"] for r in runs) / MiB,
        "others_cpus": max(r["others_cpus"] for r in runs),
    }


def table(results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace) -> str:
    rows = [
        f"| code | rebuild {args.objects:,} objects: s (best) | RSS MiB (index) "
        f"| evict {args.evictions:,} of {args.tier_objects:,}: s (best) "
        "| s per 1000 evictions | others' CPUs (max) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for code, by_what in results.items():
        rebuild, evict = summarise(by_what["rebuild"]), summarise(by_what["evict"])
        per_1000 = evict["seconds"] / args.evictions * 1000
        others = max(rebuild["others_cpus"], evict["others_cpus"])
        rows.append(
            f"| {code} | {rebuild['seconds']:.2f} ({rebuild['best']:.2f}) "
            f"| {rebuild['rss_mib']:.0f} ({rebuild['index_mib']:.0f}) "
            f"| {evict['seconds']:.2f} ({evict['best']:.2f}) | {per_1000:.3f} | {others:.2f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_measure"]:
        return _measure(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000, help="objects to rebuild")
    parser.add_argument("--tier-objects", type=int, default=20_000, help="objects in the tier")
    parser.add_argument("--evictions", type=int, default=10_000, help="objects to evict")
    parser.add_argument("--runs", type=int, default=3, help="runs per code (default 3)")
    parser.add_argument(
        "--python", help="interpreter of the code before (its store imported as node.store)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    args = parser.parse_args(argv)
    if args.evictions > args.tier_objects:
        parser.error("--evictions must not exceed --tier-objects")

    codes = {"after": (sys.executable, "cachefs.node")}
    if args.python:
        codes = {"before": (args.python, "node"), **codes}
    work = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.work))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        code: {"rebuild": [], "evict": []} for code in codes
    }
    try:
        print(f"writing {args.objects:,} objects under {work}", flush=True)
        footprint = synthesise(work / "rebuild", args.objects)
        quota = args.tier_objects * footprint
        for run in range(1, args.runs + 1):
            for code, (python, package) in codes.items():  # alternately: the same conditions
                result = run_measurement(
                    python,
                    package,
                    "rebuild",
                    work / "rebuild",
                    10 * args.objects * footprint,
                    0,
                    args.timeout,
                )
                results[code]["rebuild"].append(result)
                print(f"run {run} {code} rebuild: {result['seconds']:.2f} s", flush=True)
                tier = work / f"evict-{code}-{run}"
                synthesise(tier, args.tier_objects)
                result = run_measurement(
                    python, package, "evict", tier, quota, args.evictions, args.timeout
                )
                results[code]["evict"].append(result)
                print(f"run {run} {code} evict: {result['seconds']:.2f} s", flush=True)
                shutil.rmtree(tier)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = table(results, args)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store.md").write_text(text + "\n")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "store.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
