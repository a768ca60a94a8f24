"""The scrubber of a real ``cachefs node``: a bit that flips on the disk after its block
was verified is found, the block discarded and fetched again (only it), never served.

Each test fills the node from the S3 test origin, reads through the node so that the
blocks are verified, damages the data file on disk, and polls the metrics endpoint
(with a deadline) until the scrubber reports the block; reads then go through gRPC.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import NodeProcess
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.node.config import ScrubConfig, load_config

BLOCK = 64 * 1024
CHART = Path(__file__).resolve().parents[1] / "charts" / "cachefs"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(node: NodeProcess) -> tuple[str, Samples]:
    """The metrics page and its samples, keyed by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(node.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def _scrub(node: NodeProcess) -> tuple[int, int, int]:
    """(bytes scrubbed, passes completed, bad blocks in the disk tier) from the metrics."""
    _, samples = _scrape(node)

    def value(name: str, **labels: str) -> int:
        return int(samples[(name, frozenset(labels.items()))])

    return (
        value("cachefs_scrub_bytes_total"),
        value("cachefs_scrub_passes_total"),
        value("cachefs_scrub_bad_blocks_total", tier="disk"),
    )


def _flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([old ^ 0x10]))


def _data_file(node: NodeProcess, object_id: str) -> Path:
    return node.cache_dir / "v1" / "objects" / object_id[:2] / object_id / "data"


def _block_get(index: int) -> tuple[int, int]:
    """The inclusive range a GET of block ``index`` asks for (a full block)."""
    return index * BLOCK, (index + 1) * BLOCK - 1


def _scrub_records(node: NodeProcess, level: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in node.records()
        if r["logger"] == "cachefs.scrub" and (level is None or r["level"] == level)
    ]


@pytest.fixture
def start_scrubbing(start_node, tmp_path, s3) -> Callable[..., NodeProcess]:
    """Nodes with 64 KiB blocks, no read-ahead, and the given ``scrub:`` section."""

    numbers = itertools.count()

    def start(env: dict[str, str] | None = None, **scrub: Any) -> NodeProcess:
        cache = tmp_path / f"cache-{next(numbers)}"
        config = tmp_path / f"{cache.name}.yaml"
        settings = {
            "cache_dir": str(cache),
            "block_size": BLOCK,
            "readahead_blocks": 0,
            "scrub": scrub,
        }
        config.write_text(yaml.safe_dump(settings))
        return start_node(cache, config=config, tcp=False, env=env)

    return start


def _wait_bad(node: NodeProcess, count: int) -> tuple[int, int, int]:
    return wait_for(
        lambda: (status := _scrub(node))[2] >= count and status,
        timeout=30,
        message=f"the scrubber to report {count} bad block(s)",
    )


def _wait_logged(node: NodeProcess, url: str, index: int) -> dict[str, Any]:
    """The scrubber's warning about block ``index`` of ``url``, once it is logged."""
    return wait_for(
        lambda: next(
            (
                r
                for r in _scrub_records(node, "warning")
                if r.get("url") == url and r.get("block") == index
            ),
            None,
        ),
        timeout=10,
        message=f"the scrubber's line about block {index}",
    )


def test_a_flipped_bit_in_a_verified_block_is_found_and_only_that_block_refetched(
    start_scrubbing, s3
) -> None:
    """The whole object was read (so verified) before the bit flipped: only the
    scrubber can find it. Complete, so repaired into a new file."""
    node = start_scrubbing(rate="4MiB", pause=0.05)
    data = os.urandom(5 * BLOCK + 100)
    s3.put("scrub/model.bin", data)
    url = s3.url("scrub/model.bin")
    client = NodeClient(node.unix_endpoint)
    client.prefetch([url])
    info = client.stat(url)
    assert client.read(info, 0, info.size) == data
    assert info.complete and info.local_path
    path = Path(info.local_path)

    _flip_bit(path, 2 * BLOCK + 1234)
    s3.reset_requests()
    assert _wait_bad(node, 1)[2] == 1
    line = _wait_logged(node, url, 2)
    assert line["tier"] == "disk"
    assert path.stat().st_ino != info.inode  # a complete file is never rewritten in place
    assert s3.gets("scrub/model.bin") == []  # the repair fetches nothing: the next read does

    again = client.stat(url)
    assert client.read(again, 0, again.size) == data
    assert s3.gets("scrub/model.bin") == [_block_get(2)]

    # The refetched block is good: a pass that started after the read finds nothing.
    _, passes, _ = _scrub(node)
    later = wait_for(
        lambda: next(
            (r for r in _scrub_records(node, "info") if r.get("scrub_pass", 0) >= passes + 2),
            None,
        ),
        timeout=30,
        message="a pass that started after the read",
    )
    assert later["blocks"] == 6 and later["bad_blocks"] == 0
    assert _scrub(node)[2] == 1
    assert client.read(again, 0, again.size) == data
    assert s3.gets("scrub/model.bin") == [_block_get(2)]


def test_an_incomplete_object_nobody_holds_is_repaired_in_place(start_scrubbing, s3) -> None:
    node = start_scrubbing(rate="4MiB", pause=0.05)
    data = os.urandom(6 * BLOCK)
    s3.put("scrub/partial.bin", data)
    url = s3.url("scrub/partial.bin")
    client = NodeClient(node.unix_endpoint)
    info = client.stat(url)
    assert client.read(info, 0, 3 * BLOCK) == data[: 3 * BLOCK]  # blocks 0-2 only
    path = _data_file(node, info.id)
    inode = path.stat().st_ino

    _flip_bit(path, BLOCK + 7)
    s3.reset_requests()
    _wait_bad(node, 1)
    _wait_logged(node, info.url, 1)
    assert path.stat().st_ino == inode  # the same file: block 1 forgotten in it

    assert client.read(info, 0, 3 * BLOCK) == data[: 3 * BLOCK]
    assert s3.gets("scrub/partial.bin") == [_block_get(1)]
    assert path.stat().st_ino == inode


def test_a_linked_object_is_repaired_into_a_new_file_and_the_view_keeps_its_inode(
    start_scrubbing, s3
) -> None:
    node = start_scrubbing(rate="4MiB", pause=0.05)
    data = os.urandom(4 * BLOCK + 10)
    s3.put("scrub/view/model.safetensors", data)
    url = s3.url("scrub/view/model.safetensors")
    client = NodeClient(node.unix_endpoint)
    view = Path(client.view("job:scrub", [url]).path) / "model.safetensors"
    info = client.stat(url)
    path = Path(info.local_path or "")
    assert view.stat().st_ino == path.stat().st_ino == info.inode
    assert client.read(info, 0, info.size) == data

    _flip_bit(path, 3 * BLOCK + 99)  # the view's file is the same inode: both change
    s3.reset_requests()
    _wait_bad(node, 1)
    _wait_logged(node, info.url, 3)

    assert view.stat().st_ino == info.inode  # whoever holds the view keeps its file
    assert path.stat().st_ino != info.inode
    assert path.stat().st_nlink == 1 and view.stat().st_nlink == 1
    again = client.stat(url)
    assert client.read(again, 0, again.size) == data
    assert s3.gets("scrub/view/model.safetensors") == [_block_get(3)]


def test_the_rate_is_honoured(start_scrubbing, s3) -> None:
    """Bytes counted between two scrapes never exceed the rate times the time between
    them (plus two chunks), while the passes in between read the whole object each."""
    rate = 256 * 1024
    chunk = 16 * 1024  # a sixteenth of a second's worth
    node = start_scrubbing(rate=rate, pause=0)
    data = os.urandom(4 * BLOCK)
    s3.put("scrub/paced.bin", data)
    NodeClient(node.unix_endpoint).prefetch([s3.url("scrub/paced.bin")])

    before = time.monotonic()
    first_bytes, first_passes, _ = _scrub(node)
    last_bytes, _, bad = wait_for(
        lambda: (status := _scrub(node))[1] >= first_passes + 3 and status,
        timeout=60,
        message="three more passes",
    )
    after = time.monotonic()

    assert bad == 0
    scrubbed = last_bytes - first_bytes
    assert scrubbed >= 2 * len(data)  # two whole passes at least fell in between
    assert scrubbed <= rate * (after - before) + 2 * chunk


def test_objects_vanishing_or_filling_mid_pass_do_not_break_it(start_scrubbing, s3) -> None:
    rate = 256 * 1024
    node = start_scrubbing(rate=rate, pause=0)
    big, small, late = os.urandom(16 * BLOCK), os.urandom(2 * BLOCK), os.urandom(3 * BLOCK)
    s3.put("scrub/big.bin", big)
    s3.put("scrub/small.bin", small)
    s3.put("scrub/late.bin", late)
    client = NodeClient(node.unix_endpoint)
    client.prefetch([s3.url("scrub/big.bin")])  # first in the tier: first in each pass
    client.prefetch([s3.url("scrub/small.bin")])

    # Right after a pass ends, the next one starts with big.bin: evict it two blocks in.
    _, passes, _ = _scrub(node)
    start_bytes, start_passes, _ = wait_for(
        lambda: (status := _scrub(node))[1] > passes and status, timeout=60, message="a pass"
    )
    scrubbed, now_passes, _ = wait_for(
        lambda: (status := _scrub(node))[0] >= start_bytes + 2 * BLOCK and status,
        timeout=30,
        message="two blocks of the next pass",
    )
    assert now_passes == start_passes and scrubbed - start_bytes < 15 * BLOCK  # in big.bin
    assert client.evict([s3.url("scrub/big.bin")]).objects == 1
    client.prefetch([s3.url("scrub/late.bin")])  # filled while the pass goes on
    _, filled_passes, _ = _scrub(node)

    # A pass that started after the fill checks exactly what is left: small and late.
    later = wait_for(
        lambda: next(
            (
                r
                for r in _scrub_records(node, "info")
                if r.get("scrub_pass", 0) >= filled_passes + 2
            ),
            None,
        ),
        timeout=60,
        message="a pass that started after the fill",
    )
    assert later["blocks"] == 5 and later["bad_blocks"] == 0
    info = client.stat(s3.url("scrub/late.bin"))
    _flip_bit(_data_file(node, info.id), 2 * BLOCK + 1)
    _wait_bad(node, 1)
    _wait_logged(node, info.url, 2)
    assert client.read(info, 0, info.size) == late
    assert _scrub_records(node, "error") == []


def test_sigterm_stops_a_pass_under_way(start_scrubbing, s3) -> None:
    """A pass of a minute at this rate: the node still drains and exits at once."""
    node = start_scrubbing(rate="16KiB", pause=0)
    s3.put("scrub/slow.bin", os.urandom(16 * BLOCK))
    NodeClient(node.unix_endpoint).prefetch([s3.url("scrub/slow.bin")])
    scrubbed = _scrub(node)[0]
    wait_for(lambda: _scrub(node)[0] > scrubbed, timeout=30, message="the scrubber reading")

    node.signal(signal.SIGTERM)
    assert node.wait_exit(timeout=30) == 0
    messages = [r["msg"] for r in node.records()]
    assert "stopped" in messages
    assert _scrub_records(node, "error") == []


@pytest.mark.exercises("CACHEFS_SCRUB__RATE")
def test_rate_zero_starts_no_scrubber(start_scrubbing, s3) -> None:
    """The environment form turns off what the file turns on."""
    on = start_scrubbing(rate="1MiB", pause=60)
    off = start_scrubbing(env={"CACHEFS_SCRUB__RATE": "0"}, rate="1MiB", pause=60)
    on_text, _ = _scrape(on)
    off_text, _ = _scrape(off)
    assert "cachefs_scrub_passes_total" in on_text
    assert "cachefs_scrub_" not in off_text
    assert any("scrubber" in r["msg"] for r in _scrub_records(on))
    assert _scrub_records(off) == []


def test_the_scrub_section_as_the_readme_writes_it(tmp_path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("scrub: {rate: 64MiB, pause: 3600}\n")
    assert load_config(path, environ={}).scrub == ScrubConfig(rate=64 * 1024**2, pause=3600.0)
    assert load_config(environ={}).scrub == ScrubConfig()  # on by default
    off = load_config(path, environ={"CACHEFS_SCRUB__RATE": "0", "CACHEFS_SCRUB__PAUSE": "1.5"})
    assert off.scrub == ScrubConfig(rate=0, pause=1.5)


@pytest.mark.parametrize(
    ("environ", "key", "variable"),
    [
        ({"CACHEFS_SCRUB__RATE": "fast"}, "scrub.rate", "CACHEFS_SCRUB__RATE"),
        ({"CACHEFS_SCRUB__RATE": "-1"}, "scrub.rate", "CACHEFS_SCRUB__RATE"),
        ({"CACHEFS_SCRUB__PAUSE": "-5"}, "scrub.pause", "CACHEFS_SCRUB__PAUSE"),
        ({"CACHEFS_SCRUB__PAUSE": "soon"}, "scrub.pause", "CACHEFS_SCRUB__PAUSE"),
        ({"CACHEFS_SCRUB__PAUSE": "true"}, "scrub.pause", "CACHEFS_SCRUB__PAUSE"),
        ({"CACHEFS_SCRUB": "0"}, "'scrub'", "CACHEFS_SCRUB__<KEY>"),
    ],
)
def test_a_bad_scrub_setting_names_its_key_and_variable(
    environ: dict[str, str], key: str, variable: str
) -> None:
    with pytest.raises(ValueError) as info:
        load_config(environ=environ)
    assert key in str(info.value) and variable in str(info.value)


def _rendered_scrub(chart: Any, values: dict[str, Any], tmp_path: Path) -> ScrubConfig:
    """The scrub settings of the node config the chart renders from ``values``."""
    manifests = chart.render(values, name="cachefs", namespace="cachefs")
    (configmap,) = [
        obj
        for path, text in manifests.items()
        if path.endswith(".yaml")
        for obj in yaml.safe_load_all(text)
        if obj and obj["kind"] == "ConfigMap"
    ]
    rendered = yaml.safe_load(configmap["data"]["config.yaml"])
    config = tmp_path / "chart-config.yaml"
    config.write_text(yaml.safe_dump({"scrub": rendered["scrub"]}))
    return load_config(config, environ={}).scrub


def test_the_chart_hands_the_scrub_section_to_the_node(tmp_path) -> None:
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        assert _rendered_scrub(chart, {}, tmp_path) == ScrubConfig()
        off = _rendered_scrub(chart, {"config": {"scrub": {"rate": 0}}}, tmp_path)
        assert off == ScrubConfig(rate=0)
        for scrub, where in [
            ({"rate": "fast"}, "/config/scrub/rate"),
            ({"rate": -1}, "/config/scrub/rate"),
            ({"pause": -1}, "/config/scrub/pause"),
            ({"every": 60}, "/config/scrub"),
        ]:
            with pytest.raises(helm_python.HelmValuesError) as refused:
                chart.validate_schema(chart.merge_values({"config": {"scrub": scrub}}))
            assert f"at '{where}'" in str(refused.value)
