"""Repeated crashes: one node of a cluster SIGKILLed 20 times mid-prefetch, then every
stored byte checked against the origin.

Three real ``cachefs node`` processes share blocks over a moto S3 origin. The first
runs cluster prefetches of a few multi-block objects; the third (the victim) is
killed with SIGKILL at seeded random points of its progress and restarted on the
same cache directory and address, 20 times. After each crash every block its meta
files record must hold the origin's bytes, and no block recorded before the crash
may be lost by the restart. At the end a cluster prefetch completes on every node,
each object is read back through each node (gRPC and the verified local file) and
every recorded block on disk is compared with the origin: zero wrong bytes. The
blocks fetched more than once (what the crashes cost) are counted from the
origin's request log and the survivors' metrics, and printed.

The seed is printed; ``CRASH_LOOP_SEED=N`` replays a run's kill points.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml
from daemon import TOKEN, NodeProcess, loopback_addresses
from servers import S3Bucket, wait_for

from cachefs.client import NodeClient
from cachefs.types import JobStatus

KIB = 1024
BLOCK = 16 * KIB
CONCURRENCY = 4  # fills in flight per node: what one crash can waste is bounded by it
KILLS = 20
SIZES_IN_BLOCKS = (48, 40, 32, 24)  # whole blocks: the metrics' bytes count blocks exactly
_BLOCK_LINE = re.compile(rb"b (\d+) ([0-9a-f]{16})")

Blocks = dict[tuple[str, int], int]  # (object key, block index) -> recorded xxh3


def read_meta(meta: Path) -> tuple[dict[str, Any], dict[int, int]] | None:
    """A meta file's header and the blocks it records, parsed apart from the store:
    complete lines only (a torn last line records nothing). None if it is gone."""
    try:
        raw = meta.read_bytes()
    except FileNotFoundError:
        return None  # retired meanwhile
    first, newline, rest = raw.partition(b"\n")
    if not newline:
        return None
    blocks = {}
    for line in rest.split(b"\n")[:-1]:
        match = _BLOCK_LINE.fullmatch(line)
        if match:
            blocks[int(match[1])] = int(match[2], 16)
    return json.loads(first), blocks


def metas(root: Path) -> list[Path]:
    """The meta files of the objects under ``root`` (staging directories are not yet)."""
    found = (root / "v1" / "objects").glob("*/*/meta")
    return [meta for meta in found if not meta.parent.name.startswith(".new-")]


def recorded_blocks(root: Path, bucket: str) -> Blocks:
    """Every block the meta files under ``root`` record, with its checksum."""
    blocks: Blocks = {}
    for meta in metas(root):
        parsed = read_meta(meta)
        if parsed is not None:
            key = parsed[0]["url"].removeprefix(f"s3://{bucket}/")
            blocks.update(((key, index), checksum) for index, checksum in parsed[1].items())
    return blocks


def wrong_bytes(got: bytes, expected: bytes) -> int:
    """Bytes of ``got`` that differ from ``expected``, a length difference included."""
    if got == expected:
        return 0
    return sum(a != b for a, b in zip(got, expected, strict=False)) + abs(len(got) - len(expected))


def check_disk(root: Path, bucket: str, files: Mapping[str, bytes]) -> tuple[int, int]:
    """(wrong bytes, blocks checked) of every recorded block under ``root``: its bytes
    in the data file and its recorded checksum against the origin's block."""
    wrong = checked = 0
    for meta in metas(root):
        parsed = read_meta(meta)
        assert parsed is not None, f"{meta} is empty"
        header, blocks = parsed
        data = files[header["url"].removeprefix(f"s3://{bucket}/")]
        assert header["size"] == len(data) and header["block_size"] == BLOCK
        assert (meta.parent / "data").stat().st_size == len(data)
        with open(meta.parent / "data", "rb") as fh:
            for index, checksum in blocks.items():
                expected = data[index * BLOCK : (index + 1) * BLOCK]
                fh.seek(index * BLOCK)
                wrong += wrong_bytes(fh.read(len(expected)), expected)
                assert checksum == xxhash.xxh3_64_intdigest(expected), (header["url"], index)
                checked += 1
    return wrong, checked


def deliveries(
    s3: S3Bucket,
    files: Mapping[str, bytes],
    survivors: list[NodeProcess],
    addresses: list[str],
    victim_address: str,
) -> dict[str, int]:
    """Blocks delivered to each side, from the origin's log and the survivors' counters
    (they were never killed, so theirs cover the whole run; the victim's died with it).

    Survivors: their origin reads plus the blocks they took from peers. The victim:
    the origin GETs the survivors did not make, plus the blocks the survivors served
    that did not go to each other.
    """
    origin_gets = sum(len(s3.gets(key)) for key in files)
    survivor_reads = survivor_from_peers = served = between_survivors = 0
    for node, address in zip(survivors, addresses, strict=True):
        samples = node.scrape()
        survivor_reads += int(
            samples.get(
                ("cachefs_origin_request_seconds_count", frozenset({("operation", "read")})), 0
            )
        )
        served += int(samples.get(("cachefs_peer_served_bytes_total", frozenset()), 0)) // BLOCK
        for other in [*addresses, victim_address]:
            if other == address:
                continue
            got = int(samples.get(("cachefs_peer_blocks_total", frozenset({("peer", other)})), 0))
            survivor_from_peers += got
            if other != victim_address:
                between_survivors += got
    return {
        "origin_gets": origin_gets,
        "survivors": survivor_reads + survivor_from_peers,
        "victim": origin_gets - survivor_reads + served - between_survivors,
    }


def finished(client: NodeClient, job_id: str) -> JobStatus | None:
    """The job's final status once it ended, else None."""
    status = client.job(job_id)
    return status if status is not None and status.finished else None


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("CRASH_LOOP_SEED", "20260213"))
    print(f"crash loop seed: {value} (CRASH_LOOP_SEED={value} replays its kill points)")
    return value


def test_twenty_crashes_of_a_node_mid_cluster_prefetch_leave_no_wrong_byte(
    start_node: Callable[..., NodeProcess],
    tmp_path: Path,
    s3: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
    seed: int,
) -> None:
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)  # the test's own clients speak TCP too
    rng = random.Random(seed)
    files = {
        f"model/shard-{i}.bin": rng.randbytes(count * BLOCK)
        for i, count in enumerate(SIZES_IN_BLOCKS)
    }
    for key, data in files.items():
        s3.put(key, data)
    per_node = sum(SIZES_IN_BLOCKS)
    source = s3.url("model/")
    addresses = loopback_addresses(3)

    def start(index: int) -> NodeProcess:
        cache = tmp_path / f"cache-{index}"
        config = tmp_path / f"node-{index}.yaml"
        settings = {
            "cache_dir": str(cache),
            "block_size": BLOCK,
            "concurrency": CONCURRENCY,
            "cluster": {
                "membership": "static",
                "peers": addresses,
                "peer_timeout": 10,
                "backoff": 1,
            },
        }
        config.write_text(yaml.safe_dump(settings))
        return start_node(
            cache, config=config, tcp=addresses[index], socket_path=tmp_path / f"n{index}.sock"
        )

    survivors = [start(0), start(1)]
    victim = start(2)
    coordinator = NodeClient(survivors[0].unix_endpoint)
    # Kill points: seeded counts of the victim's recorded blocks, spread over its copy.
    thresholds = sorted(rng.sample(range(1, per_node), KILLS))
    print(f"kill points (blocks recorded on the victim): {thresholds}")

    def start_job() -> str:
        return coordinator.prefetch([source], cluster=True, detach=True).id

    def refused(status: JobStatus) -> AssertionError:
        """A job that ended otherwise than succeeded while every node was up: the
        coordinator waits for a member that just restarted, so this is a failure."""
        return AssertionError(f"seed {seed}: a cluster prefetch with every node up: {status}")

    before: Blocks = {}
    for kill, threshold in enumerate(thresholds, 1):
        job_id = start_job()

        def time_to_kill(
            threshold: int = threshold, node: NodeProcess = victim, job_id: str = job_id
        ) -> bool:
            assert node.process.poll() is None, "the victim died on its own:\n" + "\n".join(
                node.lines[-20:]
            )
            if len(recorded_blocks(node.cache_dir, s3.name)) >= threshold and _has_a_job(node):
                return True  # at the point, and the round's share has reached the victim
            ended = finished(coordinator, job_id)
            if ended is None:
                return False
            if ended.state == "succeeded":
                return True  # the victim finished between the two looks: kill it now
            raise refused(ended)  # before the kill point

        try:
            wait_for(time_to_kill, timeout=30, message=f"kill point {kill}")
        except AssertionError as exc:
            state = coordinator.job(job_id)
            raise AssertionError(
                f"seed {seed}: {exc}; the cluster job: {state}; the victim's last log "
                "lines:\n" + "\n".join(victim.lines[-30:])
            ) from None
        victim.kill()
        ended = wait_for(
            lambda job_id=job_id: finished(coordinator, job_id),
            timeout=30,
            message=f"the cluster job of round {kill} to end",
        )
        after = recorded_blocks(victim.cache_dir, s3.name)
        lost = {b for b, c in before.items() if after.get(b) != c}
        assert not lost, f"seed {seed}, kill {kill}: recorded blocks lost by a restart: {lost}"
        wrong, _ = check_disk(victim.cache_dir, s3.name, files)
        assert wrong == 0, f"seed {seed}, kill {kill}: {wrong} wrong bytes recorded"
        print(
            f"kill {kill:2}: {len(after)}/{per_node} blocks recorded "
            f"(point {threshold}); the cluster job {ended.state}"
        )
        before = after
        victim = start(2)

    job_id = start_job()

    def completed() -> JobStatus | None:
        ended = finished(coordinator, job_id)
        if ended is not None and ended.state != "succeeded":
            raise refused(ended)
        return ended

    final = wait_for(completed, timeout=60, interval=0.05, message="the last cluster prefetch")
    assert final.nodes_done == 3, final

    wrong = checked = 0
    for node in [*survivors, victim]:
        client = NodeClient(node.unix_endpoint)
        entries = {entry.url: entry for entry in client.cached()}
        for key, data in files.items():
            assert entries[f"s3://{s3.name}/{key}"].complete, (node.tcp_endpoint, key)
            info = client.stat(s3.url(key))
            wrong += wrong_bytes(client.read(info, 0, len(data)), data)  # through the node
            wrong += wrong_bytes(Path(info.local_path).read_bytes(), data)  # its verified file
        disk_wrong, disk_checked = check_disk(node.cache_dir, s3.name, files)
        assert disk_checked == per_node, (node.tcp_endpoint, disk_checked)
        wrong += disk_wrong
        checked += disk_checked
    assert wrong == 0, f"seed {seed}: {wrong} wrong bytes"

    counts = deliveries(s3, files, survivors, addresses[:2], addresses[2])
    delivered = counts["survivors"] + counts["victim"]
    refetched = delivered - 3 * per_node
    print(
        f"{KILLS} kills; {checked} blocks verified, 0 wrong bytes; {delivered} blocks "
        f"delivered for {3 * per_node} needed: {refetched} refetched "
        f"(victim {counts['victim'] - per_node}, survivors {counts['survivors'] - 2 * per_node}; "
        f"origin GETs {counts['origin_gets']} for {per_node} blocks)"
    )
    record_property("blocks_refetched", refetched)
    assert counts["survivors"] >= 2 * per_node and counts["victim"] >= per_node, counts
    # A crash wastes at most the fills in flight: the victim's own and those it was
    # doing for the two survivors. Refetching recorded blocks would cost far more.
    assert refetched <= KILLS * 3 * CONCURRENCY, (seed, counts)


def _has_a_job(node: NodeProcess) -> bool:
    """Whether the node (a fresh process each round) has been given its share yet."""
    client = NodeClient(node.unix_endpoint, reconnect_grace=0)
    try:
        return bool(client.status().jobs)
    finally:
        client.close()
