"""The ``cachefs`` command: prefetch, ls, evict, unpin, status.

Without a node daemon the commands run the engine in-process on the local cache
directory (embedded mode). Every failure exits non-zero with a one-line reason;
``--json`` prints JSON lines (progress events, then a summary or an error).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from cachefs.progress import ProgressBar

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand's default must not erase the option given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--cache-dir", help="root of the default disk tier (CACHEFS_CACHE_DIR)")
    common.add_argument("--config", help="YAML config file (CACHEFS_CONFIG)")
    common.add_argument("--json", action="store_true", help="print JSON lines")
    common.add_argument("-v", "--verbose", action="store_true", help="log what the cache does")

    parser = argparse.ArgumentParser(
        prog="cachefs",
        parents=[common],
        description="A model-weight cache: fetch once, read at local-disk speed.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prefetch = commands.add_parser(
        "prefetch",
        parents=[common],
        help="fetch sources into the cache",
        description="Fetch every object of each SOURCE (a URL or a prefix ending in /).",
    )
    prefetch.add_argument("sources", nargs="+", metavar="SOURCE")
    prefetch.add_argument("--pin", action="store_true", help="keep the objects from eviction")
    prefetch.add_argument(
        "--holder", default=None, help="name of the pin's holder (default: user:<login name>)"
    )
    prefetch.add_argument("--tier", help="tier to place new objects in (e.g. memory, disk)")
    prefetch.add_argument(
        "--wait", action="store_true", default=True, help="wait until done (the default)"
    )

    listing = commands.add_parser("ls", parents=[common], help="list cached objects")
    listing.add_argument("source", nargs="?", help="only objects under this URL or prefix")

    evict = commands.add_parser("evict", parents=[common], help="remove objects from the cache")
    evict.add_argument("sources", nargs="+", metavar="SOURCE")

    unpin = commands.add_parser("unpin", parents=[common], help="release pins")
    unpin.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="only these objects (default: everything the holder pins)",
    )
    unpin.add_argument("--holder", default=None, help="the pin's holder (default: user:<login>)")

    commands.add_parser("status", parents=[common], help="tiers, pins and counters")
    return parser


def _default_holder() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return "user:unknown"


def _engine(args: argparse.Namespace) -> Any:
    from cachefs.embedded import get_engine

    return get_engine(args.cache_dir, args.config)


def _emit(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record, sort_keys=True) + "\n")
    out.flush()


def _prefetch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    engine = _engine(args)
    holder = (args.holder or _default_holder()) if args.pin else None
    if args.holder and not args.pin:
        raise ValueError("--holder names a pin's holder: add --pin")
    bar = None if args.json else ProgressBar(err)
    last_emit = [0.0]

    def on_progress(progress: Any) -> None:  # the engine reports one at a time, in order
        if bar is not None:
            bar.update(progress)
            return
        now = time.monotonic()
        done = progress.bytes_done >= progress.bytes_total
        if now - last_emit[0] >= 0.2 or done:
            last_emit[0] = now
            _emit(
                out,
                {
                    "event": "progress",
                    "bytes_done": progress.bytes_done,
                    "bytes_total": progress.bytes_total,
                    "objects_done": progress.objects_done,
                    "objects_total": progress.objects_total,
                    "fetched_bytes": progress.fetched_bytes,
                    "seconds": round(progress.elapsed, 3),
                },
            )

    try:
        result = engine.prefetch(args.sources, pin=holder, tier=args.tier, progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    rate = result.fetched_bytes / result.seconds if result.seconds > 0 else 0.0
    summary = {
        "event": "done",
        "bytes": result.bytes,
        "objects": result.objects,
        "fetched_bytes": result.fetched_bytes,
        "cached_bytes": result.cached_before,
        "evicted_during": result.evicted_during,
        "seconds": round(result.seconds, 3),
        "rate_bytes_per_second": round(rate),
        "pinned_by": result.pinned_by,
    }
    if args.json:
        _emit(out, summary)
    else:
        from node.units import format_size

        out.write(
            f"prefetched {result.objects} objects, {format_size(result.bytes)} "
            f"({format_size(result.fetched_bytes)} from the origin, "
            f"{format_size(result.cached_before)} already cached) in {result.seconds:.1f}s"
            + (f", pinned by {holder}" if holder else "")
            + "\n"
        )
        if result.evicted_during:
            out.write(
                f"warning: {result.evicted_during} objects were evicted by later ones: the "
                "sources exceed the tier's quota (pin them, or raise the quota)\n"
            )
    return 0


def _ls(args: argparse.Namespace, out: TextIO) -> int:
    from node.units import format_size

    engine = _engine(args)
    objects = engine.matching(args.source) if args.source else engine.cached()
    objects = sorted(objects, key=lambda o: o.header.url)  # the same order either way
    for obj in objects:
        record = {
            "url": obj.header.url,
            "version": obj.header.version,
            "size": obj.header.size,
            "cached_bytes": obj.cached_bytes,
            "tier": obj.tier.name,
            "complete": obj.complete,
            "pinned_by": engine.store.holders(obj.id),
            "id": obj.id,
        }
        if args.json:
            _emit(out, record)
        else:
            state = "complete" if obj.complete else (f"partial {format_size(obj.cached_bytes)}")
            pins = f"  pinned by {', '.join(record['pinned_by'])}" if record["pinned_by"] else ""
            out.write(
                f"{obj.header.url}  {format_size(obj.header.size)}  {obj.tier.name}  "
                f"{state}{pins}\n"
            )
    return 0


def _evict(args: argparse.Namespace, out: TextIO) -> int:
    engine = _engine(args)
    evicted = [obj for source in args.sources for obj in engine.evict(source)]
    freed = sum(obj.charged for obj in evicted)
    if args.json:
        _emit(out, {"event": "done", "objects": len(evicted), "bytes": freed})
    else:
        out.write(f"evicted {len(evicted)} objects\n")
    return 0


def _unpin(args: argparse.Namespace, out: TextIO) -> int:
    engine = _engine(args)
    holder = args.holder or _default_holder()
    if args.sources:
        count = sum(engine.unpin(holder, source) for source in args.sources)
    else:
        count = engine.unpin(holder)
    if args.json:
        _emit(out, {"event": "done", "holder": holder, "objects": count})
    else:
        out.write(f"released {count} pins of {holder}\n")
    return 0


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from node.units import format_size

    engine = _engine(args)
    tiers = [vars(usage) for usage in engine.store.usage()]
    pins = {holder: len(ids) for holder, ids in engine.store.pins().items()}
    if args.json:
        _emit(out, {"tiers": tiers, "pins": pins, "counters": engine.stats.snapshot()})
        return 0
    for tier in tiers:
        out.write(
            f"tier {tier['name']} ({tier['medium']}) {tier['path']}: "
            f"{format_size(tier['used'])} of {format_size(tier['quota'])} used, "
            f"{format_size(tier['pinned'])} pinned, {tier['objects']} objects\n"
        )
    for holder, count in sorted(pins.items()):
        out.write(f"pin {holder}: {count} objects\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name, default in (
        ("cache_dir", None),
        ("config", None),
        ("json", False),
        ("verbose", False),
    ):
        args.__dict__.setdefault(name, default)
    out, err = sys.stdout, sys.stderr
    logging.basicConfig(
        stream=err,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="cachefs: %(levelname)s: %(message)s",
    )
    try:
        if args.command == "prefetch":
            return _prefetch(args, out, err)
        if args.command == "ls":
            return _ls(args, out)
        if args.command == "evict":
            return _evict(args, out)
        if args.command == "unpin":
            return _unpin(args, out)
        if args.command == "status":
            return _status(args, out)
        parser.error(f"unknown command {args.command}")
    except KeyboardInterrupt:
        err.write("cachefs: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure: one line, non-zero exit
        message = _one_line(exc)
        if args.json:
            _emit(out, {"event": "error", "error": message, "kind": type(exc).__name__})
        err.write(f"cachefs: error: {message}\n")
        return EXIT_FAILURE
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        text = exc.strerror
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
