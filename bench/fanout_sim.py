"""Fan-out at scale, on paper: a model of a cluster prefetch against every node alone.

    python bench/fanout_sim.py [--model-gb 140] [--nodes 10 20 50 100 200 500 1000]
                               [--link 25] [--cores 4] [--disk-gbs 4] [--origin-gbps 100]
                               [--conn-mbs 50] [--rtt-ms 30] [--window 16] [--block-mib 8]
                               [--cpu-origin S --cpu-send S --cpu-recv S | --calibration FILE]
                               [--runs-json bench/out/fanout.json] [--sim-blocks 2000]
                               [--plot bench/fanout_sim.png] [--json OUT]

It prints, in order: the inputs, the check against the real runs of
``fanout_bench.py`` (N <= 8 nodes on one machine), the predictions for ``--nodes``, and
the case of the public figure (a 130 GB model to 200 nodes). Nothing here runs cachefs.

What the code does, and so what is modelled
-------------------------------------------

A model of ``B`` bytes is cut into blocks of ``--block-mib`` (8 MiB). Rendezvous
hashing gives each block one owner; over thousands of blocks that is a uniform random
choice, which is what the model draws. In a cluster prefetch (node/cluster/prefetch.py)
every node gets the same manifest and prefetches every block (node/engine.py):

* all blocks go on one pool of ``concurrency`` threads (16: ``--window``), in the
  order of ``Peers.fill_order`` (node/cluster/peers.py): first the blocks this node
  owns, in the manifest's order, then the others in the manifest's order rotated to
  start at an offset of the node's own (xxh3 of its address modulo their count; the
  model draws it at random). Before that, every node took all blocks in the
  manifest's order, the same order on every node, and so walked the model in step
  with the others: mode ``cluster (before: in-order walk)``, kept for comparison;
* a block this node owns comes from the origin (node/cluster/peers.py: the owner asks
  the next two nodes' caches first; in a fresh prefetch they have nothing: a LAN round
  trip each, left out beside the origin's 30 ms);
* a block another node owns is asked of its owner (the second-ranked node only if the
  owner fails). The owner fills it from the origin once (single flight with its own
  prefetch and every other asker), and only when the block is complete in its store
  does it send it (sendfile). No node relays a block it got from an owner: there is no
  tree. So the owner of a block sends it N - 1 times, and every node sends
  ``(N - 1) * B / N`` bytes and receives as many (``send_volume``).

Origin bytes: the cluster reads every block once, ``B``; nodes alone read ``N * B``.

Resources
---------

Per node: a NIC of ``--link`` Gbit/s each way; ``--cores`` cores for cachefs; the CPU
seconds per GiB of an origin fill, of a block sent to a peer and of a block received
from one (``--cpu-origin``, ``--cpu-send``, ``--cpu-recv``, or ``--calibration`` with
``{"origin_fill": x, "peer_send": y, "peer_recv": z}``: what bench/cpu_bench.py measures);
a disk writing ``--disk-gbs`` GB/s. The origin: each connection gets its first byte
``--rtt-ms`` after the request and then ``--conn-mbs`` MB/s (object storage's
per-connection limits), one connection per block in flight; all nodes together get at
most ``--origin-gbps`` Gbit/s out of it (``inf``: no cap).

Wall time is the largest of these bounds (each one the time that one resource needs
alone; they overlap, so the largest is what the run cannot beat), plus a fixed set-up
time (resolving the model, starting the jobs):

* ``origin connections``: a node's own origin fills go ``window`` at a time, each
  ``rtt + block / conn`` long: ``window * block / (rtt + block / conn)`` per node;
* ``origin cap``: the origin bytes over the origin's aggregate egress;
* ``NIC in`` / ``NIC out``: the bytes a node receives / sends over its link;
* ``CPU``: ``(origin * B/N + send * (N-1)/N * B + recv * (N-1)/N * B) / cores`` per node
  in a cluster, ``origin * B / cores`` alone;
* ``disk``: ``B`` over the disk's write rate;
* ``owned-first walk (sim)`` (``cluster``) and ``in-order walk (sim)`` (``cluster
  (before: in-order walk)``): a block-level simulation of the walk, because the walk
  can bind before any link does. In the in-order walk all nodes want the same 16
  blocks at the same time; the first asker of a block waits for its owner's fill
  (``rtt + block / conn``, about 0.2 s with the defaults), and the single flight
  releases every other asker at the same moment, so the nodes stay bunched: the 16 or
  so owners of the blocks in flight carry the whole cluster's traffic while the other
  nodes' links idle. In the owned-first walk each node first fills its own share from
  the origin (the fills the others would wait for), then asks for the others' blocks
  from its own offset, so at any time the nodes ask different owners for different
  blocks. The simulation: every node keeps ``window`` blocks in flight in its order; a
  request reaches the owner after a LAN round trip (plus a little random jitter, so
  that ties break as they would); the owner fills the block once, on its own walk or
  the first request, whichever comes first; each owner's egress is shared equally
  among the blocks it is sending, each of which also gets at most the receiver's link
  over ``window``. For a model of more than ``--sim-blocks`` blocks the first
  ``--sim-blocks`` are simulated and the time scaled to all of them. The first blocks
  are slower (the in-order walk while the nodes spread out, the owned-first walk
  while every node fills its few own blocks before it asks for any other), so few
  blocks overstate a large N: for the in-order walk 2000 blocks land within about 5%
  of 4000 for N = 100 to 500; for the owned-first walk 2000 blocks give about 15%
  more than 4000 at N = 100 and about 25% more at N = 1000 (where each node owns only
  two of the 2000). The random owners, offsets and jitter move the result by up to
  about 5% from one ``--seed`` to another.
  CPU and disk are left to their own bounds.

``cluster (fluid)`` is the same cluster without any walk: what it would take if the
owners' egress were evenly loaded all along. It is the best a one-hop design can do
with these resources.

Alone: every node reads all ``B`` from the origin with ``window`` connections, bounded
by its origin connections, link, CPU and disk, and all nodes together by the origin cap.

The check against the real runs
-------------------------------

``fanout_bench.py`` ran N = 1, 2, 4, 8 nodes on one 2-core machine over loopback
(bench/RESULTS.md, *Cluster fan-out*): a 1 GiB model, every node on CPU 1 (one core
shared by all of them and the driver), the origin (rclone and the throttling proxy) on
CPU 0, 50 MB/s and 30 ms per connection, and at most about 780 MB/s in all (the proxy's
core is full; ``--check-proxy``). ``check_setup`` describes that machine and
``check_calibration`` fits its four figures to three of those runs (marked ¹ in the
table), so that the other five are predictions:

* origin fill 1.1 CPU-s/GiB: the node of N = 1 (1.1 CPU-s for the 1 GiB model);
* contention (the one fudge): with P daemons on one core each GiB costs
  ``1 + c * (P - 1)`` times as much (caches, context switches, the GIL handed between
  threads of eight processes); c from N = 8 alone, 20.7 CPU-s for 8 GiB = 2.35x N = 1;
* peer send + receive, per GiB moved: from N = 2 cluster (4.9 CPU-s), split evenly
  between the two sides (only the sum matters: every node sends what it receives);
* set-up: N = 1's wall time less the model's (resolving the model through the 30 ms
  origin, starting the job, the six small-file GETs the model's 128 blocks leave out).

Those runs' cachefs sent peer blocks over gRPC; the code now sends them with
sendfile(2) (docs/cluster.md), which should cost the sender less (not measured
here): give the new figures with ``--calibration`` (bench/cpu_bench.py) for the
predictions; the defaults are the old ones (the fitted figures without contention).
Every node shares one core there, so the runs check the CPU accounting, the origin's
connections and cap and the origin bytes; they cannot check links or the walks,
which only a real cluster can. (Those runs walked in order; the CPU binds there, so
the check predicts them with the code's ``cluster`` mode, which gives the same.)
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
MiB = 2**20
GB = 1e9
NODES = (10, 20, 50, 100, 200, 500, 1000)
PUBLIC = {"model_gb": 130.0, "nodes": 200, "alone_bytes": 26e12, "cluster_bytes": 130e9}
CLUSTER = "cluster"  # the code: each node its own blocks first, then the rest from its offset
BEFORE = "cluster (before: in-order walk)"  # the code before: every node in manifest order
FLUID = "cluster (fluid)"
ALONE = "alone"
MODES = (CLUSTER, BEFORE, FLUID, ALONE)
WALKS = ("in-order", "owned-first")


@dataclass(frozen=True)
class Costs:
    """CPU-seconds per GiB on one node: origin fill, peer send, peer receive."""

    origin_fill: float = 1.1
    peer_send: float = 1.5
    peer_recv: float = 1.5


@dataclass(frozen=True)
class Setup:
    """The model, the nodes and the origin (see the module's docstring)."""

    model_bytes: float
    block_bytes: int = 8 * MiB
    link_gbps: float = 25.0  # per node, each direction
    cores: float = 4.0  # per node, for cachefs
    shared_cores: float | None = None  # all nodes share these cores instead (one machine)
    contention: float = 0.0  # extra cost per GiB per further daemon on a shared core
    disk_gbs: float = 4.0  # per node, GB/s written
    origin_gbps: float = 100.0  # all nodes together; inf: no cap
    conn_mbs: float = 50.0  # per origin connection, MB/s after the first byte
    rtt_s: float = 0.03  # origin: request to first byte
    window: int = 16  # blocks in flight per node (cachefs concurrency)
    peer_rtt_s: float = 0.0005  # LAN: request to a peer to its first byte
    setup_s: float = 0.0  # resolving the model, starting the jobs
    costs: Costs = field(default_factory=Costs)

    @property
    def blocks(self) -> int:
        return max(1, math.ceil(self.model_bytes / self.block_bytes))

    @property
    def fill_s(self) -> float:
        """One block from the origin on one connection."""
        return self.rtt_s + self.block_bytes / (self.conn_mbs * 1e6)

    @property
    def link_bps(self) -> float:
        """Bytes per second of a node's link, each way."""
        return self.link_gbps * 1e9 / 8

    @property
    def origin_node_bps(self) -> float:
        """What one node's ``window`` origin connections sustain, bytes per second."""
        return self.window * self.block_bytes / self.fill_s


@dataclass
class Prediction:
    nodes: int
    mode: str  # one of MODES
    seconds: float
    bottleneck: str
    bounds: dict[str, float]
    origin_bytes: float
    cpu_s_per_node: float
    send_bytes_per_node: float
    recv_bytes_per_node: float


def send_volume(nodes: int, model_bytes: float) -> float:
    """Bytes each node sends to its peers in a cluster prefetch: its share ``B / N``
    (the blocks it owns) to each of the ``N - 1`` others."""
    return (nodes - 1) * model_bytes / nodes


def origin_bytes(mode: str, nodes: int, model_bytes: float) -> float:
    """The cluster reads every block from the origin once; nodes alone read it N times."""
    return model_bytes if mode.startswith("cluster") else nodes * model_bytes


def cpu_per_node(setup: Setup, mode: str, nodes: int) -> float:
    """CPU-seconds one node spends (with the contention of a shared core, if any)."""
    b, c = setup.model_bytes / GiB, setup.costs
    if mode.startswith("cluster"):
        peer = send_volume(nodes, b)  # sent and received alike
        work = c.origin_fill * b / nodes + (c.peer_send + c.peer_recv) * peer
    else:
        work = c.origin_fill * b
    sharing = nodes if setup.shared_cores else 1
    return work * (1 + setup.contention * (sharing - 1))


def _common_bounds(setup: Setup, mode: str, nodes: int) -> dict[str, float]:
    b = setup.model_bytes
    cpu = cpu_per_node(setup, mode, nodes)
    cpu_s = cpu * nodes / setup.shared_cores if setup.shared_cores else cpu / setup.cores
    cap = setup.origin_gbps * 1e9 / 8
    own = b / nodes if mode.startswith("cluster") else b  # what the node fills itself
    bounds = {
        "origin connections": own / setup.origin_node_bps,
        "origin cap": origin_bytes(mode, nodes, b) / cap if cap > 0 else math.inf,
        "NIC in": (b - own if mode.startswith("cluster") else b) / setup.link_bps,
        "CPU": cpu_s,
        "disk": b / (setup.disk_gbs * 1e9),
    }
    if mode.startswith("cluster"):
        bounds["NIC out"] = send_volume(nodes, b) / setup.link_bps
    return bounds


def predict(
    setup: Setup, mode: str, nodes: int, sim_blocks: int = 2000, seed: int = 1
) -> Prediction:
    """Wall time and origin bytes of ``mode`` on ``nodes`` nodes."""
    bounds = _common_bounds(setup, mode, nodes)
    if mode == "alone":
        # A node's own walk: rounds of ``window`` fills (the last one partial).
        bounds["origin connections"] = math.ceil(setup.blocks / setup.window) * setup.fill_s
    elif mode == CLUSTER:
        bounds["owned-first walk (sim)"] = owned_first_walk(setup, nodes, sim_blocks, seed)
    elif mode == BEFORE:
        bounds["in-order walk (sim)"] = in_order_walk(setup, nodes, sim_blocks, seed)
    elif mode != FLUID:
        raise ValueError(f"unknown mode {mode!r}")
    bottleneck = max(bounds, key=lambda k: bounds[k])
    received = setup.model_bytes if mode == "alone" else send_volume(nodes, setup.model_bytes)
    return Prediction(
        nodes=nodes,
        mode=mode,
        seconds=setup.setup_s + bounds[bottleneck],
        bottleneck=bottleneck,
        bounds=bounds,
        origin_bytes=origin_bytes(mode, nodes, setup.model_bytes),
        cpu_s_per_node=cpu_per_node(setup, mode, nodes),
        send_bytes_per_node=0.0 if mode == "alone" else send_volume(nodes, setup.model_bytes),
        recv_bytes_per_node=received,
    )


# --- the block-level simulation of the walks -----------------------------------------


def in_order_walk(setup: Setup, nodes: int, sim_blocks: int = 2000, seed: int = 1) -> float:
    """Seconds until every node holds every block, every node walking the blocks in the
    manifest's order (the code before ``Peers.fill_order``)."""
    return walk(setup, nodes, sim_blocks, seed, order="in-order")


def owned_first_walk(setup: Setup, nodes: int, sim_blocks: int = 2000, seed: int = 1) -> float:
    """Seconds until every node holds every block, each node walking its own blocks first
    and then the others from an offset of its own (the code: ``Peers.fill_order``)."""
    return walk(setup, nodes, sim_blocks, seed, order="owned-first")


def walk(
    setup: Setup, nodes: int, sim_blocks: int = 2000, seed: int = 1, order: str = "owned-first"
) -> float:
    """``simulate`` with ``order``; scaled from the first ``sim_blocks`` blocks for a
    larger model."""
    blocks = min(setup.blocks, max(sim_blocks, setup.window))
    seconds = simulate(
        nodes,
        blocks,
        window=setup.window,
        block_bytes=setup.block_bytes,
        link_bps=setup.link_bps,
        fill_s=setup.fill_s,
        peer_rtt_s=setup.peer_rtt_s,
        seed=seed,
        order=order,
    )
    return seconds * setup.blocks / blocks


def simulate(
    nodes: int,
    blocks: int,
    window: int,
    block_bytes: float,
    link_bps: float,
    fill_s: float,
    peer_rtt_s: float,
    jitter_s: float = 0.0002,
    seed: int = 1,
    order: str = "owned-first",
) -> float:
    """Discrete events: each node walks the blocks with ``window`` in flight, in
    ``order``: ``"in-order"``, 0..blocks-1 on every node; ``"owned-first"``, the blocks
    it owns (ascending), then the others ascending, rotated to start at an offset drawn
    for the node (``Peers.fill_order``: xxh3 of its address modulo their count).
    Its own blocks come from the origin (``fill_s``); others' from their owner, which
    fills a block once on its first request and then sends it. An owner's egress is
    shared equally by the blocks it is sending (processor sharing, followed with a
    virtual clock per owner), each capped at ``link_bps / window`` (the receiver's
    link shared by its window). Returns when the last node holds the last block; raises
    RuntimeError if any node ends without every block."""
    if order not in WALKS:
        raise ValueError(f"unknown order {order!r}")
    rng = random.Random(seed)
    owner = [rng.randrange(nodes) for _ in range(blocks)]
    walks = [walk_order(i, owner, order, rng) for i in range(nodes)]
    filled_at: dict[int, float] = {}  # block -> when its owner holds it
    waiting: dict[int, list[int]] = {}  # block -> nodes whose request waits on the fill
    per_flow_cap = link_bps / window
    # Per owner: the bytes each of its flows has been sent (virtual clock), when that
    # was last brought forward, its flows (heap of (virtual finish, receiver)), and a
    # version that invalidates its scheduled completion when the flows change.
    served = [0.0] * nodes
    since = [0.0] * nodes
    flows: list[list[tuple[float, int]]] = [[] for _ in range(nodes)]
    version = [0] * nodes
    events: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind, a, b)
    seq = 0
    request, fill_done, local_done, send_done = range(4)

    def push(t: float, kind: int, a: int, b: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, a, b))

    def rate(o: int) -> float:
        return min(link_bps / len(flows[o]), per_flow_cap)

    def bring_forward(o: int, t: float) -> None:
        if flows[o]:
            served[o] += (t - since[o]) * rate(o)
        since[o] = t

    def schedule(o: int, t: float) -> None:
        version[o] += 1
        if flows[o]:
            left = max(flows[o][0][0] - served[o], 0.0)
            push(t + left / rate(o), send_done, o, version[o])

    def start_send(o: int, receiver: int, t: float) -> None:
        bring_forward(o, t)
        heapq.heappush(flows[o], (served[o] + block_bytes, receiver))
        schedule(o, t)

    def fill(b: int, t: float) -> float:
        if b not in filled_at:
            filled_at[b] = t + fill_s
            push(filled_at[b], fill_done, b, 0)
        return filled_at[b]

    walked = [0] * nodes
    held = [0] * nodes
    last = 0.0

    def next_block(i: int, t: float) -> None:
        if walked[i] == len(walks[i]):
            return
        b = walks[i][walked[i]]
        walked[i] += 1
        if owner[b] == i:
            push(max(fill(b, t), t), local_done, i, b)
        else:
            push(t + peer_rtt_s + rng.expovariate(1 / jitter_s), request, i, b)

    def holds(i: int, t: float) -> None:
        nonlocal last
        held[i] += 1
        if held[i] == blocks:
            last = max(last, t)
        next_block(i, t)

    for i in range(nodes):
        for _ in range(window):
            next_block(i, 0.0)
    while events:
        t, _, kind, a, b = heapq.heappop(events)
        if kind == request:  # node a asks block b's owner
            ready = fill(b, t)
            if ready <= t:
                start_send(owner[b], a, t)
            else:
                waiting.setdefault(b, []).append(a)
        elif kind == fill_done:
            for receiver in waiting.pop(a, []):
                start_send(owner[a], receiver, t)
        elif kind == local_done:
            holds(a, t)
        elif b == version[a]:  # send_done, still current
            bring_forward(a, t)
            while flows[a] and flows[a][0][0] <= served[a] + 1.0:  # within a byte
                _, receiver = heapq.heappop(flows[a])
                holds(receiver, t)
            schedule(a, t)
    if held != [blocks] * nodes:
        raise RuntimeError(f"the walk ended with nodes short of blocks: {held}")
    return last


def walk_order(node: int, owner: Sequence[int], order: str, rng: random.Random) -> list[int]:
    """The blocks in the order ``node`` fills them (see ``simulate``); ``rng`` draws
    its offset into the others (xxh3 of an address is as good as a random draw)."""
    blocks = range(len(owner))
    if order == "in-order":  # no draw: the in-order walk's jitter stays as it was
        return list(blocks)
    own = [b for b in blocks if owner[b] == node]
    others = [b for b in blocks if owner[b] != node]
    if others:
        shift = rng.randrange(len(others))
        others = others[shift:] + others[:shift]
    return own + others


# --- the check against the real runs --------------------------------------------------

# bench/RESULTS.md, Cluster fan-out: medians of 2 runs; origin bytes counted at the
# proxy (HTTP headers included); nodes' CPU-seconds where the table gives them.
MEASURED: list[dict[str, Any]] = [
    {"nodes": 1, "mode": "cluster", "seconds": 2.27, "origin_bytes": 1073860287, "cpu": 1.1},
    {"nodes": 1, "mode": "alone", "seconds": 2.23, "origin_bytes": 1073860287, "cpu": None},
    {"nodes": 2, "mode": "cluster", "seconds": 5.43, "origin_bytes": 1073860287, "cpu": 4.9},
    {"nodes": 2, "mode": "alone", "seconds": 4.40, "origin_bytes": 2147720574, "cpu": 2.8},
    {"nodes": 4, "mode": "cluster", "seconds": 22.55, "origin_bytes": 1073860287, "cpu": 21.3},
    {"nodes": 4, "mode": "alone", "seconds": 10.81, "origin_bytes": 4295441148, "cpu": None},
    {"nodes": 8, "mode": "cluster", "seconds": 48.74, "origin_bytes": 1073860287, "cpu": 46.5},
    {"nodes": 8, "mode": "alone", "seconds": 24.86, "origin_bytes": 8590882296, "cpu": 20.7},
]
CHECK_MODEL_BYTES = GiB


def check_setup() -> Setup:
    """The machine of the real runs, before its CPU figures are fitted."""
    return Setup(
        model_bytes=CHECK_MODEL_BYTES,
        link_gbps=100.0,  # loopback: no NIC; moving the bytes is in the CPU figures
        shared_cores=1.0,  # every node (and the driver) on CPU 1
        disk_gbs=math.inf,  # page cache; writeback is in the CPU of others
        origin_gbps=0.78 * 8,  # 780 MB/s: the proxy's core full (--check-proxy)
        conn_mbs=50.0,
        rtt_s=0.03,
        window=16,
        peer_rtt_s=0.0001,
    )


def load_measured(path: Path | None) -> tuple[list[dict[str, Any]], float]:
    """The real runs: from a fanout.json (medians per N and mode) or RESULTS.md's table."""
    if path is None:
        return MEASURED, CHECK_MODEL_BYTES
    stored = json.loads(path.read_text())
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in stored["runs"]:
        if not run.get("error"):
            groups.setdefault((run["nodes"], run["mode"]), []).append(run)
    rows = []
    for (nodes, mode), runs in sorted(groups.items()):
        cpu = [sum(r["cpu_seconds"]["nodes"]) for r in runs if r.get("cpu_seconds")]
        rows.append(
            {
                "nodes": nodes,
                "mode": mode,
                "seconds": statistics.median(r["seconds"] for r in runs),
                "origin_bytes": statistics.median(r["origin_bytes"] for r in runs),
                "cpu": statistics.median(cpu) if cpu else None,
            }
        )
    return rows, float(stored["model_bytes"])


def check_calibration(
    measured: Sequence[dict[str, Any]], model_bytes: float
) -> tuple[Setup, list[str]]:
    """``check_setup`` with its CPU figures and set-up time fitted to three of the runs
    (see the module's docstring); the reasons, one line each."""
    rows = {(r["nodes"], r["mode"]): r for r in measured}
    b = model_bytes / GiB
    base = replace(check_setup(), model_bytes=model_bytes)
    one, eight, two = rows.get((1, "cluster")), rows.get((8, "alone")), rows.get((2, "cluster"))
    if not (one and one["cpu"] and eight and eight["cpu"] and two and two["cpu"]):
        raise ValueError("the check needs node CPU for N=1 cluster, N=8 alone, N=2 cluster")
    origin = one["cpu"] / b
    contention = (eight["cpu"] / (8 * b) / origin - 1) / 7
    peer = two["cpu"] / (1 + contention) / b - origin  # N=2: B/2 each way per node, x2 nodes
    costs = Costs(origin_fill=origin, peer_send=peer / 2, peer_recv=peer / 2)
    fitted = replace(base, costs=costs, contention=contention)
    setup_s = one["seconds"] - predict(fitted, "cluster", 1).seconds
    fitted = replace(fitted, setup_s=setup_s)
    why = [
        f"origin fill {origin:.2f} CPU-s/GiB: N=1 cluster, {one['cpu']} CPU-s for {b:.2f} GiB",
        f"contention {contention:.3f} per further daemon on the core: N=8 alone, "
        f"{eight['cpu']} CPU-s for {8 * b:.2f} GiB = {eight['cpu'] / (8 * b) / origin:.2f}x N=1",
        f"peer send + receive {peer:.2f} CPU-s per GiB moved (split evenly): N=2 cluster, "
        f"{two['cpu']} CPU-s",
        f"set-up {setup_s:.2f} s: N=1 cluster's {one['seconds']} s less the model's",
    ]
    return fitted, why


def check(setup: Setup, measured: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predicted against measured, per run; ``fitted`` marks the runs the figures came from."""
    fitted = {(1, "cluster"), (2, "cluster"), (8, "alone")}
    out = []
    for r in measured:
        p = predict(setup, r["mode"], r["nodes"])
        out.append(
            {
                "nodes": r["nodes"],
                "mode": r["mode"],
                "measured_s": r["seconds"],
                "predicted_s": p.seconds,
                "error": p.seconds / r["seconds"] - 1,
                "bottleneck": p.bottleneck,
                "measured_origin_bytes": r["origin_bytes"],
                "predicted_origin_bytes": p.origin_bytes,
                "origin_error": p.origin_bytes / r["origin_bytes"] - 1,
                "measured_cpu": r["cpu"],
                "predicted_cpu": p.cpu_s_per_node * r["nodes"],
                "fitted": (r["nodes"], r["mode"]) in fitted,
            }
        )
    return out


# --- output -----------------------------------------------------------------------------


def finite(value: Any) -> Any:
    """``value`` with every infinite float as None (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 600 else f"{s:.0f} s ({s / 60:.0f} min)"


def inputs_text(setup: Setup, source: str) -> str:
    c = setup.costs
    return (
        f"Model {human(setup.model_bytes)} in {setup.blocks} blocks of "
        f"{setup.block_bytes / MiB:g} MiB; per node: {setup.link_gbps:g} Gbit/s link each way, "
        + (
            f"{setup.cores:g} cores"
            if setup.shared_cores is None
            else f"{setup.shared_cores:g} core shared by all nodes, contention "
            f"{setup.contention:.3f}"
        )
        + f", disk {setup.disk_gbs:g} GB/s, {setup.window} blocks in "
        f"flight; origin {setup.conn_mbs:g} MB/s per connection after {setup.rtt_s * 1000:g} ms "
        f"(a node's {setup.window} connections: {setup.origin_node_bps / 1e6:.0f} MB/s), "
        f"{setup.origin_gbps:g} Gbit/s in all; peer round trip {setup.peer_rtt_s * 1000:g} ms; "
        f"CPU-s/GiB: origin fill {c.origin_fill:.2f}, peer send {c.peer_send:.2f}, "
        f"peer receive {c.peer_recv:.2f} ({source})."
    )


def check_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| N | mode | measured s | predicted s | error | bound | measured origin | "
        "predicted origin | error | nodes CPU-s measured / predicted |",
        "|--:|---|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        cpu = "-" if r["measured_cpu"] is None else f"{r['measured_cpu']:.1f}"
        lines.append(
            f"| {r['nodes']} | {r['mode']}{' ¹' if r['fitted'] else ''} | {r['measured_s']:.2f} | "
            f"{r['predicted_s']:.2f} | {100 * r['error']:+.0f}% | {r['bottleneck']} | "
            f"{r['measured_origin_bytes']:,.0f} | {r['predicted_origin_bytes']:,.0f} | "
            f"{100 * r['origin_error']:+.3f}% | {cpu} / {r['predicted_cpu']:.1f} |"
        )
    return "\n".join(lines)


def prediction_table(rows: Sequence[dict[str, Prediction]]) -> str:
    lines = [
        "| N | cluster wall | bound | cluster (before: in-order walk) wall | bound | "
        "cluster (fluid) wall | alone wall | bound | "
        "origin bytes cluster | origin bytes alone | CPU-s per node cluster / alone |",
        "|--:|--:|---|--:|---|--:|--:|---|--:|--:|--:|",
    ]
    for row in rows:
        c, o, f, a = row[CLUSTER], row[BEFORE], row[FLUID], row[ALONE]
        lines.append(
            f"| {c.nodes} | {duration(c.seconds)} | {c.bottleneck} | {duration(o.seconds)} | "
            f"{o.bottleneck} | {duration(f.seconds)} "
            f"({f.bottleneck}) | {duration(a.seconds)} | {a.bottleneck} | "
            f"{human(c.origin_bytes)} | {human(a.origin_bytes)} | "
            f"{c.cpu_s_per_node:.0f} / {a.cpu_s_per_node:.0f} |"
        )
    return "\n".join(lines)


def plot(
    path: Path,
    rows: Sequence[dict[str, Prediction]],
    unlimited: Sequence[Prediction],
    checked: Sequence[dict[str, Any]],
    setup: Setup,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wall, origin, real) = plt.subplots(1, 3, figsize=(15, 4.4))
    ns = [row["cluster"].nodes for row in rows]
    styles = [
        (CLUSTER, "cluster prefetch (the code: owned first, own offset)", "tab:red", "o", "-"),
        (BEFORE, "cluster prefetch before (in-order walk)", "tab:orange", "^", "--"),
        (FLUID, "cluster, owners evenly loaded (fluid)", "tab:orange", "", ":"),
        (ALONE, f"each node alone, origin {setup.origin_gbps:g} Gbit/s", "tab:blue", "s", "-"),
    ]
    for mode, label, color, marker, line in styles:
        wall.plot(
            ns, [row[mode].seconds for row in rows], marker=marker or None, color=color,
            linestyle=line, label=label,
        )  # fmt: skip
    wall.plot(
        ns, [p.seconds for p in unlimited], color="tab:blue", linestyle=":",
        label="each node alone, origin without a cap",
    )  # fmt: skip
    wall.set_ylabel("wall time until every node holds the model (s)")
    wall.set_yscale("log")
    origin.plot(
        ns, [row["cluster"].origin_bytes for row in rows], marker="o", color="tab:orange",
        label="cluster: B",
    )  # fmt: skip
    origin.plot(
        ns, [row["alone"].origin_bytes for row in rows], marker="s", color="tab:blue",
        label="alone: N x B",
    )  # fmt: skip
    origin.scatter(
        [PUBLIC["nodes"]] * 2, [PUBLIC["alone_bytes"], PUBLIC["cluster_bytes"]], marker="*",
        s=140, color="tab:green", zorder=3, label="public figure: 130 GB to 200 nodes",
    )  # fmt: skip
    origin.set_ylabel("bytes read from the origin")
    origin.set_yscale("log")
    for ax in (wall, origin):
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("nodes")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for mode, color, marker in (("cluster", "tab:red", "o"), ("alone", "tab:blue", "s")):
        pts = [r for r in checked if r["mode"] == mode]
        xs = [r["nodes"] for r in pts]
        real.plot(xs, [r["measured_s"] for r in pts], marker=marker, color=color,
                  label=f"{mode}: measured")  # fmt: skip
        real.plot(xs, [r["predicted_s"] for r in pts], marker=marker, color=color,
                  linestyle="--", fillstyle="none", label=f"{mode}: model")  # fmt: skip
    real.set_xscale("log", base=2)
    real.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    real.set_xlabel("nodes (one machine, one shared core, 1 GiB)")
    real.set_ylabel("wall time (s)")
    real.set_ylim(bottom=0)
    real.grid(alpha=0.3)
    real.legend(fontsize=8)
    real.set_title("check: the real runs", fontsize=9)
    fig.suptitle(
        f"Fan-out of a {human(setup.model_bytes)} model, {setup.link_gbps:g} Gbit/s links "
        "(model, not measured)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------


def costs_from(args: argparse.Namespace) -> tuple[Costs, str]:
    """The CPU figures: defaults, then the calibration file, then single flags."""
    values = asdict(Costs())
    source = "defaults: the fan-out runs' machine with one daemon per core (gRPC peer path)"
    if args.calibration:
        stored = json.loads(Path(args.calibration).read_text())
        stored = stored.get("calibration", stored)
        missing = [k for k in values if not isinstance(stored.get(k), (int, float))]
        if missing:
            raise SystemExit(f"{args.calibration}: no number for {', '.join(missing)}")
        values = {k: float(stored[k]) for k in values}
        source = f"from {Path(args.calibration).name}"
    flags = {"origin_fill": args.cpu_origin, "peer_send": args.cpu_send, "peer_recv": args.cpu_recv}
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        values.update(given)
        source += "; given: " + ", ".join(f"{k} {v:g}" for k, v in given.items())
    return Costs(**values), source


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fan-out of a model to N nodes on paper: cluster prefetch against alone."
    )
    parser.add_argument("--model-gb", type=float, default=140.0, help="model size, GB (1e9)")
    parser.add_argument("--nodes", type=int, nargs="+", default=list(NODES))
    parser.add_argument("--link", type=float, default=25.0, help="Gbit/s per node, each way")
    parser.add_argument("--cores", type=float, default=4.0, help="cores per node for cachefs")
    parser.add_argument("--disk-gbs", type=float, default=4.0, help="disk writes, GB/s per node")
    parser.add_argument(
        "--origin-gbps", type=float, default=100.0, help="origin egress, all nodes (inf: none)"
    )
    parser.add_argument("--conn-mbs", type=float, default=50.0, help="MB/s per origin connection")
    parser.add_argument("--rtt-ms", type=float, default=30.0, help="origin: ms to first byte")
    parser.add_argument("--peer-rtt-ms", type=float, default=0.5, help="LAN round trip, ms")
    parser.add_argument("--window", type=int, default=16, help="blocks in flight per node")
    parser.add_argument("--block-mib", type=float, default=8.0)
    parser.add_argument("--cpu-origin", type=float, help="CPU-s per GiB of origin fill")
    parser.add_argument("--cpu-send", type=float, help="CPU-s per GiB sent to a peer")
    parser.add_argument("--cpu-recv", type=float, help="CPU-s per GiB received from a peer")
    parser.add_argument(
        "--calibration",
        type=Path,
        help='JSON {"origin_fill": x, "peer_send": y, "peer_recv": z}, CPU-s per GiB',
    )
    parser.add_argument(
        "--runs-json", type=Path, help="check against this fanout.json instead of RESULTS.md's"
    )
    parser.add_argument(
        "--sim-blocks", type=int, default=2000, help="blocks simulated of the walk (then scaled)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=REPO / "bench" / "fanout_sim.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", type=Path, help="write inputs, check and predictions here")
    args = parser.parse_args(argv)

    costs, source = costs_from(args)
    setup = Setup(
        model_bytes=args.model_gb * GB,
        block_bytes=round(args.block_mib * MiB),
        link_gbps=args.link,
        cores=args.cores,
        disk_gbs=args.disk_gbs,
        origin_gbps=args.origin_gbps,
        conn_mbs=args.conn_mbs,
        rtt_s=args.rtt_ms / 1000,
        window=args.window,
        peer_rtt_s=args.peer_rtt_ms / 1000,
        costs=costs,
    )
    print("Inputs: " + inputs_text(setup, source) + "\n")

    measured, check_bytes = load_measured(args.runs_json)
    check_at, why = check_calibration(measured, check_bytes)
    checked = check(check_at, measured)
    print(
        "Check against the real runs ("
        + (args.runs_json.name if args.runs_json else "bench/RESULTS.md, Cluster fan-out")
        + "): "
        + inputs_text(check_at, "fitted below")
        + "\nCalibration (¹: the runs it came from):\n"
        + "".join(f"- {line}\n" for line in why)
    )
    print(check_table(checked))
    held_out = [r for r in checked if not r["fitted"]]
    worst = max(held_out, key=lambda r: abs(r["error"]))
    print(
        f"\nWall time, runs not used for fitting: mean |error| "
        f"{100 * statistics.mean(abs(r['error']) for r in held_out):.0f}%, worst "
        f"{100 * worst['error']:+.0f}% (N={worst['nodes']} {worst['mode']}); origin bytes: "
        f"worst {100 * max(abs(r['origin_error']) for r in checked):.3f}% (HTTP headers).\n"
    )

    rows = []
    for n in args.nodes:
        print(f"N={n} ...", file=sys.stderr, flush=True)
        rows.append({m: predict(setup, m, n, args.sim_blocks, args.seed) for m in MODES})
    uncapped = replace(setup, origin_gbps=math.inf)
    unlimited = [predict(uncapped, "alone", n) for n in args.nodes]
    print(f"Predictions ({human(setup.model_bytes)}, {args.link:g} Gbit/s links):\n")
    print(prediction_table(rows))

    public = replace(setup, model_bytes=PUBLIC["model_gb"] * GB)
    pub = {
        m: predict(public, m, PUBLIC["nodes"], args.sim_blocks, args.seed)
        for m in (CLUSTER, BEFORE, ALONE)
    }
    print(
        f"\nPublic figure: a 130 GB model to 200 nodes, origin traffic 26 TB -> about 130 GB. "
        f"This model: alone {human(pub['alone'].origin_bytes)}, cluster "
        f"{human(pub['cluster'].origin_bytes)} (every block once; HTTP headers add about "
        f"0.01%); wall time cluster {duration(pub[CLUSTER].seconds)} (before, in-order walk: "
        f"{duration(pub[BEFORE].seconds)}), alone "
        f"{duration(pub['alone'].seconds)} with these inputs."
    )
    if not args.no_plot:
        plot(args.plot, rows, unlimited, checked, setup)
        print(f"\nwrote {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                finite(
                    {
                        "inputs": {**asdict(setup), "costs_source": source},
                        "check": {
                            "inputs": asdict(check_at),
                            "calibration": why,
                            "runs": checked,
                        },
                        "predictions": [{m: asdict(p) for m, p in row.items()} for row in rows],
                        "alone_without_origin_cap": [asdict(p) for p in unlimited],
                        "public": {
                            "figure": PUBLIC,
                            "model": {m: asdict(p) for m, p in pub.items()},
                        },
                    }
                ),
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
