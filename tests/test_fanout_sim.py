"""bench/fanout_sim.py: the fan-out model's invariants and its command line."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "fanout_sim.py"
_spec = importlib.util.spec_from_file_location("fanout_sim", SCRIPT)
assert _spec is not None and _spec.loader is not None
sim = importlib.util.module_from_spec(_spec)
sys.modules["fanout_sim"] = sim  # dataclasses look their module up
_spec.loader.exec_module(sim)

MiB = 2**20
SMALL = 96 * 8 * MiB  # 96 blocks: the simulation stays quick


def setup(**changes: object) -> sim.Setup:
    return sim.Setup(model_bytes=changes.pop("model_bytes", SMALL), **changes)


@pytest.mark.parametrize("nodes", [1, 2, 7, 100, 1000])
def test_origin_bytes_cluster_is_the_model_and_alone_n_times(nodes: int) -> None:
    s = setup()
    for mode in (sim.CLUSTER, sim.BEFORE, sim.FLUID):
        assert sim.predict(s, mode, nodes, sim_blocks=32).origin_bytes == s.model_bytes
    assert sim.predict(s, "alone", nodes).origin_bytes == nodes * s.model_bytes


def test_alone_wall_time_never_falls_as_nodes_are_added() -> None:
    s = setup(model_bytes=140e9, origin_gbps=100.0)
    times = [sim.predict(s, "alone", n).seconds for n in (1, 2, 5, 10, 20, 50, 100, 1000)]
    assert times == sorted(times)
    assert times[-1] == pytest.approx(1000 * 140e9 / (100e9 / 8))  # the origin cap binds


@pytest.mark.parametrize("nodes", [1, 2, 3, 10, 1000])
def test_send_volume_is_the_owned_share_to_every_other_node(nodes: int) -> None:
    b = 140e9
    assert sim.send_volume(nodes, b) == pytest.approx((nodes - 1) * b / nodes)
    # Every block goes from its owner to the N - 1 others, whoever owns it.
    assert nodes * sim.send_volume(nodes, b) == pytest.approx((nodes - 1) * b)
    p = sim.predict(setup(model_bytes=b), "cluster (fluid)", nodes)
    assert p.send_bytes_per_node == p.recv_bytes_per_node == pytest.approx((nodes - 1) * b / nodes)


def test_cpu_per_node_adds_the_three_costs() -> None:
    costs = sim.Costs(origin_fill=1.0, peer_send=2.0, peer_recv=3.0)
    s = setup(model_bytes=10 * 2**30, costs=costs)
    assert sim.cpu_per_node(s, "alone", 5) == pytest.approx(10.0)
    assert sim.cpu_per_node(s, "cluster", 5) == pytest.approx(1.0 * 2 + (2 + 3) * 8)


@pytest.mark.parametrize("order", sim.WALKS)
def test_one_node_walks_in_rounds_of_origin_fills(order: str) -> None:
    s = setup()
    seconds = sim.simulate(
        1, 96, s.window, s.block_bytes, s.link_bps, s.fill_s, s.peer_rtt_s, seed=3, order=order
    )
    assert seconds == pytest.approx(96 / s.window * s.fill_s)


@pytest.mark.parametrize("order", sim.WALKS)
@pytest.mark.parametrize("nodes", [2, 5, 40])
def test_the_walk_is_never_faster_than_the_links_or_the_fills(nodes: int, order: str) -> None:
    s = setup()
    walk = sim.walk(s, nodes, sim_blocks=96, order=order)
    assert walk >= sim.send_volume(nodes, s.model_bytes) / s.link_bps
    assert walk >= s.fill_s + s.block_bytes / s.link_bps  # one fill, one send
    if order == "in-order":  # every node waits on rounds of fills, in step
        assert walk >= math.ceil(s.blocks / s.window) * s.fill_s * 0.99
    fluid = sim.predict(s, sim.FLUID, nodes)
    for mode in (sim.CLUSTER, sim.BEFORE):
        assert sim.predict(s, mode, nodes, sim_blocks=96).seconds >= fluid.seconds


def test_the_modes_use_their_walks() -> None:
    s = setup()
    code = sim.predict(s, sim.CLUSTER, 20, sim_blocks=96)
    before = sim.predict(s, sim.BEFORE, 20, sim_blocks=96)
    assert code.bounds["owned-first walk (sim)"] == sim.owned_first_walk(s, 20, 96)
    assert before.bounds["in-order walk (sim)"] == sim.in_order_walk(s, 20, 96)
    assert "in-order walk (sim)" not in code.bounds
    with pytest.raises(ValueError):
        sim.simulate(2, 8, 4, 1.0, 1.0, 0.1, 0.001, order="backwards")


@pytest.mark.parametrize("nodes", [1, 2, 7, 50])
def test_the_owned_first_order_is_own_blocks_then_the_others_rotated(nodes: int) -> None:
    rng = random.Random(5)
    owner = [rng.randrange(nodes) for _ in range(200)]
    for node in range(nodes):
        order = sim.walk_order(node, owner, "owned-first", random.Random(node))
        assert sorted(order) == list(range(200))  # every block, once
        own = [b for b in range(200) if owner[b] == node]
        assert order[: len(own)] == own  # its own first, in the manifest's order
        rest = order[len(own) :]
        others = [b for b in range(200) if owner[b] != node]
        if rest:
            shift = others.index(rest[0])
            assert rest == others[shift:] + others[:shift]
    assert sim.walk_order(0, owner, "in-order", rng) == list(range(200))


@pytest.mark.parametrize("order", sim.WALKS)
@pytest.mark.parametrize("nodes", [1, 3, 12])
def test_every_node_receives_every_block(
    nodes: int, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup()
    walked: dict[int, list[int]] = {}
    real_order = sim.walk_order

    def recording(node: int, owner: list[int], how: str, rng: random.Random) -> list[int]:
        walked[node] = real_order(node, owner, how, rng)
        return walked[node]

    monkeypatch.setattr(sim, "walk_order", recording)
    # simulate raises unless every node ends holding every block.
    seconds = sim.simulate(
        nodes, 96, s.window, s.block_bytes, s.link_bps, s.fill_s, s.peer_rtt_s, order=order
    )
    assert 0 < seconds < math.inf
    assert {i: sorted(b) for i, b in walked.items()} == {i: list(range(96)) for i in range(nodes)}


def test_a_node_short_of_a_block_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    s = setup()
    real_order = sim.walk_order
    monkeypatch.setattr(sim, "walk_order", lambda *args: real_order(*args)[1:])
    with pytest.raises(RuntimeError, match="short of blocks"):
        sim.simulate(3, 96, s.window, s.block_bytes, s.link_bps, s.fill_s, s.peer_rtt_s)


@pytest.mark.parametrize("nodes", [10, 20, 50, 100])
def test_owned_first_is_never_slower_than_in_order_at_ten_nodes_and_more(nodes: int) -> None:
    s = sim.Setup(model_bytes=140e9)  # the default setup, fewer blocks simulated
    before = sim.predict(s, sim.BEFORE, nodes, sim_blocks=400)
    code = sim.predict(s, sim.CLUSTER, nodes, sim_blocks=400)
    assert code.bounds["owned-first walk (sim)"] <= before.bounds["in-order walk (sim)"]
    assert code.seconds <= before.seconds


def test_the_check_reproduces_the_runs_it_was_fitted_to() -> None:
    fitted, why = sim.check_calibration(sim.MEASURED, sim.CHECK_MODEL_BYTES)
    assert len(why) == 4
    rows = {(r["nodes"], r["mode"]): r for r in sim.check(fitted, sim.MEASURED)}
    assert rows[(1, "cluster")]["predicted_s"] == pytest.approx(2.27)
    for key in ((1, "cluster"), (2, "cluster"), (8, "alone")):
        assert rows[key]["fitted"]
        assert rows[key]["predicted_cpu"] == pytest.approx(rows[key]["measured_cpu"])
    for r in rows.values():
        assert abs(r["origin_error"]) < 0.001  # HTTP headers only


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--sim-blocks", "150", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )


def test_cli_prints_the_table_and_writes_the_plot_and_json(tmp_path: Path) -> None:
    plot, out = tmp_path / "sim.png", tmp_path / "sim.json"
    # The plot needs the bench extra (matplotlib); the tables and the JSON do not.
    plots = importlib.util.find_spec("matplotlib") is not None
    drawing = ["--plot", str(plot)] if plots else ["--no-plot"]
    done = run_cli(tmp_path, "--nodes", "10", "50", *drawing, "--json", str(out))
    text = done.stdout
    for column in (
        "| N | cluster wall | bound | cluster (before: in-order walk) wall | bound | "
        "cluster (fluid) wall | alone wall | bound |",
        "origin bytes cluster | origin bytes alone | CPU-s per node cluster / alone |",
    ):
        assert column in text
    assert "| 10 |" in text and "| 50 |" in text
    assert "Check against the real runs" in text and "| 8 | cluster |" in text
    assert "Public figure" in text and "alone 26 TB, cluster 130 GB" in text
    assert "CPU-s/GiB: origin fill 1.10" in text  # the inputs, printed
    assert plot.stat().st_size > 0 if plots else not plot.exists()
    stored = json.loads(out.read_text())
    assert [row["alone"]["nodes"] for row in stored["predictions"]] == [10, 50]
    assert stored["predictions"][1]["alone"]["origin_bytes"] == 50 * 140e9
    assert stored["predictions"][1]["cluster"]["origin_bytes"] == 140e9
    assert set(stored["predictions"][0]) == set(sim.MODES)
    assert "owned-first walk (sim)" in stored["predictions"][0]["cluster"]["bounds"]
    assert "in-order walk (sim)" in stored["predictions"][0][sim.BEFORE]["bounds"]
    assert "(before, in-order walk:" in text
    assert len(stored["check"]["runs"]) == 8


def test_cli_takes_a_calibration_file_and_single_flags(tmp_path: Path) -> None:
    calibration = tmp_path / "cpu.json"
    calibration.write_text(json.dumps({"origin_fill": 0.7, "peer_send": 0.2, "peer_recv": 0.9}))
    done = run_cli(
        tmp_path, "--nodes", "10", "--no-plot", "--calibration", str(calibration),
        "--cpu-send", "0.25",
    )  # fmt: skip
    assert "origin fill 0.70, peer send 0.25, peer receive 0.90 (from cpu.json" in done.stdout
