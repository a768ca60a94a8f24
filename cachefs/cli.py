"""The ``cachefs`` command: prefetch, ls, evict, unpin, status, and node (the daemon).

With ``--endpoint`` (or ``CACHEFS_ENDPOINT``) the commands ask that node; without
one they run the engine in-process on the local cache directory (embedded mode),
with the same output. Every failure exits non-zero with a one-line reason;
``--json`` prints JSON lines (progress events, then a summary or an error).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from cachefs.progress import ProgressBar
from cachefs.types import CacheClient, JobStatus

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as the shell reports a command a closed pipe stopped
# The CSI plugin's defaults, for its --help (the parser imports no daemon module; a
# test holds these equal to the plugin's and the config's own).
CSI_ENDPOINT = "unix:///csi/csi.sock"
CSI_NODE_ENDPOINT = "unix:///run/cachefs/cachefs.sock"
CSI_STATE_DIR = "/var/lib/cachefs/csi"
CSI_PUBLISH_TIMEOUT = 60.0


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand's default must not erase the option given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--endpoint", help="the node to ask: unix:///path.sock or host:port (CACHEFS_ENDPOINT)"
    )
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
        "--cluster",
        action="store_true",
        help="onto every node of the node's cluster (the origin serves each block once)",
    )
    waiting = prefetch.add_mutually_exclusive_group()
    waiting.add_argument(
        "--wait", action="store_true", default=True, help="wait until done (the default)"
    )
    waiting.add_argument(
        "--detach", action="store_true", help="print the node's job id and return at once"
    )

    cancel = commands.add_parser(
        "cancel",
        parents=[common],
        help="stop a prefetch job",
        description="Stop the node's prefetch job JOB_ID (from prefetch --detach or status): "
        "nothing new is fetched, the pins it added are released, what it fetched stays cached.",
    )
    cancel.add_argument("job_id", metavar="JOB_ID")

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

    commands.add_parser("status", parents=[common], help="tiers, pins, jobs and counters")

    label = commands.add_parser(
        "label",
        parents=[common],
        help="the Node label a source gets where it is complete",
        description="Print the Node label (cachefs.io/<hash>) nodes carry while SOURCE is "
        "complete on them: use it in a pod's nodeAffinity.",
    )
    label.add_argument("source", metavar="SOURCE")

    node = commands.add_parser(
        "node",
        parents=[common],
        help="run the node daemon",
        description="Serve the cache over gRPC until SIGTERM (then drain).",
    )
    node.add_argument("--socket", help="unix socket for local clients")
    node.add_argument("--address", help="HOST:PORT for TCP clients (needs CACHEFS_TOKEN)")
    node.add_argument("--metrics-address", help="HOST:PORT of the Prometheus endpoint")
    node.add_argument("--node-id", help="this node's name (default: the host name)")
    node.add_argument(
        "--peers",
        help="HOST:PORT,... of every node of a static cluster (this one included)",
    )

    plugin = commands.add_parser(
        "csi",
        parents=[common],
        help="run the CSI node plugin",
        description="Serve the CSI Identity and Node services; volumes come from the node "
        f"at --endpoint (CACHEFS_ENDPOINT; default {CSI_NODE_ENDPOINT}).",
    )
    plugin.add_argument(
        "--csi-endpoint",
        help=f"unix:///path.sock kubelet calls (CSI_ENDPOINT; default {CSI_ENDPOINT})",
    )
    plugin.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PREFIX",
        help="an origin prefix every pod's volume may name (repeatable; a policy rule)",
    )
    plugin.add_argument("--node-id", help="the Kubernetes node name (default: NODE_NAME; required)")
    plugin.add_argument(
        "--state-dir",
        help=f"where published volumes are recorded (csi.state_dir; default {CSI_STATE_DIR})",
    )
    plugin.add_argument(
        "--publish-timeout",
        type=float,
        help="seconds a publish waits for the prefetch "
        f"(csi.publish_timeout; default {CSI_PUBLISH_TIMEOUT:g})",
    )
    return parser


def _default_holder() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return "user:unknown"


def _client(args: argparse.Namespace) -> CacheClient:
    from cachefs.connect import connect

    return connect(args.endpoint, args.cache_dir, args.config)


def _emit(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record, sort_keys=True) + "\n")
    out.flush()


def _prefetch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args)
    holder = (args.holder or _default_holder()) if args.pin else None
    if args.holder and not args.pin:
        raise ValueError("--holder names a pin's holder: add --pin")
    bar = None if args.json else ProgressBar(err)
    last_emit = [0.0]

    def on_progress(progress: JobStatus) -> None:  # reports arrive one at a time, in order
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
                    "peer_bytes": progress.peer_bytes,
                    "seconds": round(progress.seconds, 3),
                },
            )

    try:
        result = client.prefetch(
            args.sources,
            pin=holder,
            tier=args.tier,
            progress=on_progress,
            detach=args.detach,
            cluster=args.cluster,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.detach:
        if args.json:
            _emit(out, {"event": "started", "job": result.id})
        else:
            out.write(f"{result.id}\n")
        return 0
    moved = result.fetched_bytes + result.peer_bytes
    rate = moved / result.seconds if result.seconds > 0 else 0.0
    summary = {
        "event": "done",
        "bytes": result.bytes_total,
        "objects": result.objects_total,
        "fetched_bytes": result.fetched_bytes,
        "peer_bytes": result.peer_bytes,
        "cached_bytes": result.cached_before,
        "evicted_during": result.evicted_during,
        "seconds": round(result.seconds, 3),
        "rate_bytes_per_second": round(rate),
        "pinned_by": result.pin_holder,
    }
    if args.json:
        _emit(out, summary)
    else:
        from cachefs.units import format_size

        out.write(
            f"prefetched {_count(result.objects_total, 'object')}, "
            f"{format_size(result.bytes_total)} "
            f"({format_size(result.fetched_bytes)} from the origin, "
            + (f"{format_size(result.peer_bytes)} from peers, " if result.peer_bytes else "")
            + f"{format_size(result.cached_before)} already cached) in {result.seconds:.1f}s"
            + (f", pinned by {holder}" if holder else "")
            + "\n"
        )
        if result.evicted_during:
            out.write(
                f"warning: {_count(result.evicted_during, 'object')} evicted by later ones: the "
                "sources exceed the tier's quota (pin them, or raise the quota)\n"
            )
    return 0


def _count(number: int, noun: str) -> str:
    """``1 object``, ``2 objects``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _cancel(args: argparse.Namespace, out: TextIO) -> int:
    status = _client(args).cancel(args.job_id)
    if args.json:
        _emit(out, {"event": "cancel", "job": status.id, "state": status.state})
    elif status.state == "cancelled":
        out.write(f"job {status.id} cancelled; the blocks it fetched stay cached\n")
    elif status.finished:
        out.write(f"job {status.id} had already {status.state}\n")
    else:
        out.write(f"job {status.id} is stopping: blocks in flight finish first\n")
    return 0


def _ls(args: argparse.Namespace, out: TextIO) -> int:
    from cachefs.units import format_size

    for entry in _client(args).cached(args.source):
        record = {
            "url": entry.url,
            "version": entry.version,
            "size": entry.size,
            "cached_bytes": entry.cached_bytes,
            "tier": entry.tier,
            "complete": entry.complete,
            "pinned_by": list(entry.pinned_by),
            "id": entry.id,
            "verified": entry.verified,
            "superseded": entry.superseded,
        }
        if args.json:
            _emit(out, record)
        else:
            state = "complete" if entry.complete else f"partial {format_size(entry.cached_bytes)}"
            # Checked against the origin's digest (or waiting to be); "blocks" goes unsaid.
            if entry.verified != "blocks":
                state += f"  verified: {entry.verified}"
            if entry.superseded:
                state += "  superseded (evicted first)"
            pins = f"  pinned by {', '.join(entry.pinned_by)}" if entry.pinned_by else ""
            out.write(
                f"{entry.url}  {_short_version(entry.version)}  {format_size(entry.size)}  "
                f"{entry.tier}  {state}{pins}\n"
            )
    return 0


def _short_version(version: str) -> str:
    """A version as a column: ETags lose their quotes; a long one keeps its start and
    its end, where versions differ (an mtime's last digits); ``--json`` has it whole."""
    text = version.replace('"', "") or "-"
    return text if len(text) <= 24 else f"{text[:12]}…{text[-8:]}"


def _evict(args: argparse.Namespace, out: TextIO) -> int:
    evicted = _client(args).evict(args.sources)
    if args.json:
        _emit(out, {"event": "done", "objects": evicted.objects, "bytes": evicted.bytes})
    else:
        out.write(
            f"evicted {_count(evicted.objects, 'object')}"
            + ("" if evicted.objects else " (nothing cached matches)")
            + "\n"
        )
    return 0


def _unpin(args: argparse.Namespace, out: TextIO) -> int:
    holder = args.holder or _default_holder()
    count = _client(args).unpin(holder, args.sources)
    if args.json:
        _emit(out, {"event": "done", "holder": holder, "objects": count})
    else:
        out.write(
            f"released {_count(count, 'pin')} of {holder}"
            + ("" if count else " (it holds none of these)")
            + "\n"
        )
    return 0


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from cachefs.units import format_size

    status = _client(args).status()
    if args.json:
        _emit(out, status.to_dict())
        return 0
    if status.node_id:
        out.write(f"node {status.node_id}\n")
    if status.members:
        out.write(f"cluster {len(status.members)} members: {', '.join(status.members)}\n")
    for tier in status.tiers:
        out.write(
            f"tier {tier.name} ({tier.medium}) {tier.path}: "
            f"{format_size(tier.used)} of {format_size(tier.quota)} used, "
            f"{format_size(tier.pinned)} pinned, {_count(tier.objects, 'object')}"
            + (f"; DEGRADED: {tier.reason}" if tier.state == "degraded" else "")
            + "\n"
        )
    for holder, count in sorted(status.pins.items()):
        out.write(f"pin {holder}: {_count(count, 'object')}\n")
    for job in status.jobs:
        out.write(
            f"job {job.id} {job.state}: {format_size(job.bytes_done)} of "
            f"{format_size(job.bytes_total)}, {job.objects_done}/{job.objects_total} "
            f"objects ({', '.join(job.sources)})" + (f": {job.error}" if job.error else "") + "\n"
        )
    ratio = status.hit_ratio
    served = sum(status.served_bytes.values())
    out.write(
        f"served {format_size(served)}"
        + (f", {ratio:.1%} from the cache" if ratio is not None else "")
        + f"; fetched {format_size(status.fetched_bytes)} from origins"
        # Embedded mode has no daemon to keep counting between commands.
        + ("" if status.node_id else " (by this command: embedded mode counts per process)")
        + "\n"
    )
    return 0


def _csi(args: argparse.Namespace) -> int:
    from cachefs.node import logs

    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    from pathlib import Path

    from cachefs.csi.plugin import DEFAULT_CSI_ENDPOINT, DEFAULT_NODE_ENDPOINT, PluginSettings, run
    from cachefs.node.config import checked_publish_timeout, load_config
    from cachefs.node.policy import Policy, Rule

    loaded = load_config(args.config)
    config = loaded.csi
    # --allow PREFIX: every pod may view what is under PREFIX (a rule of the policy).
    policy = Policy(
        loaded.policy.rules + tuple(Rule.parse(["pod"], ["view"], [p]) for p in args.allow)
    )
    node_id = args.node_id or os.environ.get("NODE_NAME")
    if not node_id:
        raise ValueError(
            "the CSI plugin needs the Kubernetes node name: set NODE_NAME or --node-id"
        )
    settings = PluginSettings(
        csi_endpoint=args.csi_endpoint or os.environ.get("CSI_ENDPOINT") or DEFAULT_CSI_ENDPOINT,
        node_endpoint=args.endpoint or os.environ.get("CACHEFS_ENDPOINT") or DEFAULT_NODE_ENDPOINT,
        node_id=node_id,
        policy=policy,
        state_dir=Path(args.state_dir or config.state_dir),
        publish_timeout=config.publish_timeout
        if args.publish_timeout is None
        else checked_publish_timeout(args.publish_timeout, "--publish-timeout"),
    )
    return run(settings)


def _static_peers(text: str) -> tuple[str, ...]:
    """``--peers`` as ``cluster.peers``, each entry checked here: a typo must stop the
    node with the entry named, not leave it serving alone."""
    from cachefs.node.cluster.membership import parse_peer

    hint = "write --peers HOST:PORT,HOST:PORT,... (every node's TCP address, this one included)"
    peers = tuple(entry.strip() for entry in text.split(",") if entry.strip())
    if not peers:
        raise ValueError(f"--peers names no node: {hint}")
    for entry in peers:
        try:
            parse_peer(entry)
        except ValueError:
            raise ValueError(f"--peers entry {entry!r} is not HOST:PORT: {hint}") from None
    return peers


def _check_socket_group(group: str | None) -> None:
    """``server.socket_group`` names a group of this host (or is a number): a typo must
    stop the node with the key named, before it listens."""
    if group is None or group.isdigit():
        return
    import grp

    try:
        grp.getgrnam(group)
    except KeyError:
        raise ValueError(
            f"server.socket_group {group!r} is not a group of this host: name an existing "
            "group or a numeric gid (server.socket_group in the config file, or "
            "CACHEFS_SERVER__SOCKET_GROUP)"
        ) from None


def _node(args: argparse.Namespace) -> int:
    from cachefs.node import logs

    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    from cachefs.node.config import load_config
    from cachefs.node.daemon import Listeners, default_socket, run

    peers = None if args.peers is None else _static_peers(args.peers)
    overrides: dict[str, Any] = {"cache_dir": args.cache_dir}
    config = load_config(args.config, overrides)
    server = config.server
    _check_socket_group(server.socket_group)
    if args.node_id:
        config = dataclasses.replace(
            config, server=dataclasses.replace(server, node_id=args.node_id)
        )
    if peers is not None:  # the flag overrides the config's cluster.membership and peers
        config = dataclasses.replace(
            config,
            cluster=dataclasses.replace(config.cluster, membership="static", peers=peers),
        )
    listeners = Listeners(
        socket=args.socket or server.socket or default_socket(),
        address=args.address or server.address,
        metrics_address=args.metrics_address or server.metrics_address,
    )
    return run(config, listeners)


def _command(
    parser: argparse.ArgumentParser, args: argparse.Namespace, out: TextIO, err: TextIO
) -> int:
    """Run a client command (not node or csi); its exit code."""
    if args.command == "prefetch":
        return _prefetch(args, out, err)
    if args.command == "cancel":
        return _cancel(args, out)
    if args.command == "ls":
        return _ls(args, out)
    if args.command == "evict":
        return _evict(args, out)
    if args.command == "unpin":
        return _unpin(args, out)
    if args.command == "status":
        return _status(args, out)
    if args.command == "label":
        from cachefs.node.labels import READY, label_key
        from cachefs.urls import canonical_source

        record = {
            "source": canonical_source(args.source),
            "label": label_key(args.source),
            "value": READY,
        }
        out.write(json.dumps(record) + "\n" if args.json else record["label"] + "\n")
        return 0
    parser.error(f"unknown command {args.command}")
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name, default in (
        ("endpoint", None),
        ("cache_dir", None),
        ("config", None),
        ("json", False),
        ("verbose", False),
    ):
        args.__dict__.setdefault(name, default)
    out, err = sys.stdout, sys.stderr
    # gRPC's core writes its own lines to stderr (a failed TLS handshake, say): a
    # daemon keeps its errors, so that its log stays JSON lines in all but grave cases;
    # a client command says what went wrong in its own one line.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if args.command in ("node", "csi") else "NONE")
    if args.command in ("node", "csi"):
        try:
            return _node(args) if args.command == "node" else _csi(args)
        except ImportError as exc:
            err.write(
                f"cachefs: error: cachefs {args.command} needs the daemon's packages "
                f"({exc.name} is missing): pip install 'cachefs[daemon]', or 'cachefs[node]' "
                "for every origin backend too\n"
            )
            return EXIT_FAILURE
        except Exception as exc:  # a node that cannot start: one line, non-zero exit
            err.write(f"cachefs: error: {_one_line(exc)}\n")
            return EXIT_FAILURE
    logging.basicConfig(
        stream=err,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="cachefs: %(levelname)s: %(message)s",
    )
    try:
        code = _command(parser, args, out, err)
        out.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        # The reader went away (cachefs status | head -1): stop quietly, as tools do.
        # Python flushes stdout once more at exit: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as interrupt:
        err.write("cachefs: interrupted\n")
        for note in getattr(interrupt, "__notes__", ()):
            err.write(f"cachefs: {note}\n")
        out.flush()
        err.flush()
        # Exit now: an embedded engine's fill threads would hold the interpreter until
        # every queued block was fetched (and a Ctrl-C that lands while the pool starts
        # a thread leaves one that never ends). Dropping them is safe: a block counts
        # only once its bytes and checksum record are written.
        os._exit(EXIT_INTERRUPTED)
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
