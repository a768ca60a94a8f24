"""A cluster of real nodes on 127.0.0.x: the origin serves each block once.

Four ``cachefs node`` processes with a static membership share blocks through
the block endpoint (HTTP, sendfile); the S3 origin (moto) counts every GET.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import yaml
from daemon import TOKEN
from helpers import Background
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.errors import JobCancelledError

BLOCK = 64 * 1024


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _addresses(count: int) -> list[str]:
    return [f"127.0.0.{i + 1}:{_free_port(f'127.0.0.{i + 1}')}" for i in range(count)]


@pytest.fixture
def cluster(start_node, tmp_path, s3, monkeypatch):
    """``cluster(n, members=None, env=None)``: start nodes; each sees ``members``."""
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)  # the test's own clients speak TCP
    started = []

    def start(addresses: list[str], members: list[str] | None = None, **kwargs):
        nodes = []
        for address in addresses:
            index = len(started)
            cache = tmp_path / f"cache-{index}"
            config = tmp_path / f"node-{index}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "cache_dir": str(cache),
                        "block_size": BLOCK,
                        "cluster": {
                            "membership": "static",
                            "peers": members or addresses,
                            "peer_timeout": 10,
                            "backoff": 30,
                        },
                    }
                )
            )
            node = start_node(
                cache,
                config=config,
                tcp=address,
                metrics=False,
                socket_path=tmp_path / f"node-{index}.sock",
                **kwargs,
            )
            started.append(node)
            nodes.append(node)
        return nodes

    return start


def _model(s3, sizes=(5 * BLOCK + 100, 3 * BLOCK, 700)) -> dict[str, bytes]:
    files = {f"model/part-{i}.bin": os.urandom(size) for i, size in enumerate(sizes)}
    for key, data in files.items():
        s3.put(key, data)
    return files


def _blocks(size: int) -> int:
    return -(-size // BLOCK)


def _assert_copy(node, s3, files: dict[str, bytes]) -> None:
    client = NodeClient(node.unix_endpoint)
    cached = {entry.url: entry for entry in client.cached()}
    for key, data in files.items():
        entry = cached[f"s3://{s3.name}/{key}"]
        assert entry.complete, key
        info = client.stat(s3.url(key))
        assert Path(info.local_path).read_bytes() == data  # verified by the node first


def test_cluster_prefetch_reads_each_block_from_the_origin_once(cluster, s3) -> None:
    nodes = cluster(_addresses(4))
    files = _model(s3)
    s3.reset_requests()
    result = NodeClient(nodes[0].unix_endpoint).prefetch([s3.url("model/")], cluster=True)
    assert result.state == "succeeded" and result.nodes_total == 4 and result.nodes_done == 4
    total = sum(len(d) for d in files.values())
    assert result.bytes_done == 4 * total
    # No byte is counted twice: at most one copy from the origin, three from peers. (A
    # block an owner fills to answer a peer's request before its own job reaches it is
    # in no job's counts; the origin's GETs below show each block was read once.)
    assert result.fetched_bytes <= total and result.peer_bytes <= 3 * total
    for key, data in files.items():
        gets = s3.gets(key)
        assert len(gets) == _blocks(len(data)), (key, gets)
        assert len(set(gets)) == len(gets)  # one GET per block, no block twice
    for node in nodes:
        _assert_copy(node, s3, files)
    peer_bytes = [NodeClient(n.unix_endpoint).status().served_bytes for n in nodes]
    assert peer_bytes  # every node answered
    statuses = [NodeClient(n.unix_endpoint).status() for n in nodes]
    assert all(len(s.members) == 4 for s in statuses)


def test_a_node_reading_alone_asks_the_owner_and_never_the_origin_twice(cluster, s3) -> None:
    nodes = cluster(_addresses(3))
    files = _model(s3, sizes=(8 * BLOCK,))
    key, data = next(iter(files.items()))
    readers = [NodeClient(n.unix_endpoint) for n in nodes]
    for reader in readers:  # each node reads the whole object through its cache
        assert reader.read(reader.stat(s3.url(key)), 0, len(data)) == data
    gets = s3.gets(key)
    assert len(gets) == 8 and len(set(gets)) == 8


def test_a_killed_node_mid_prefetch_leaves_the_others_complete(cluster, s3) -> None:
    nodes = cluster(_addresses(4))
    files = _model(s3, sizes=(12 * BLOCK, 6 * BLOCK))
    coordinator = NodeClient(nodes[0].unix_endpoint)
    with s3.hold_gets("model/part-0.bin") as gate:
        job = Background(lambda: coordinator.prefetch([s3.url("model/")], cluster=True))
        gate.wait_held()
        nodes[3].kill()
    outcome = job.outcome(timeout=120)
    assert isinstance(outcome, OSError) and nodes[3].tcp_endpoint in str(outcome)
    for node in nodes[:3]:
        _assert_copy(node, s3, files)
    for key, data in files.items():  # the dead node's blocks came from the origin again
        assert len(set(s3.gets(key))) == _blocks(len(data))


def test_wrong_bytes_from_a_peer_are_detected_and_never_stored(cluster, s3) -> None:
    addresses = _addresses(2)
    honest = cluster(addresses[:1], members=addresses)[0]
    liar = cluster(addresses[1:], members=addresses, env={"CACHEFS_TEST_CORRUPT_PEER_BLOCKS": "1"})[
        0
    ]
    files = _model(s3, sizes=(10 * BLOCK,))
    key, data = next(iter(files.items()))
    # The liar reads first, so it owns and holds good copies of its blocks.
    lying = NodeClient(liar.unix_endpoint)
    assert lying.read(lying.stat(s3.url(key)), 0, len(data)) == data
    s3.reset_requests()
    reader = NodeClient(honest.unix_endpoint)
    assert reader.read(reader.stat(s3.url(key)), 0, len(data)) == data
    _assert_copy(honest, s3, files)
    # Each block the liar sent was refused and fetched from the origin instead.
    assert s3.gets(key), "every block came from the liar: none was refused"
    assert any("checksum" in line for line in honest.lines)


def _liar_and_honest(cluster) -> tuple:
    """Two nodes; the liar flips a byte of every block it sends and sends the checksum
    of the wrong bytes, so its blocks pass the block check."""
    addresses = _addresses(2)
    honest = cluster(addresses[:1], members=addresses)[0]
    env = {"CACHEFS_TEST_CORRUPT_PEER_BLOCKS": "recompute"}
    liar = cluster(addresses[1:], members=addresses, env=env)[0]
    return liar, honest


def test_a_peer_that_recomputes_checksums_is_caught_by_the_origins_digest(cluster, s3) -> None:
    """Blocks that match the checksum the peer sent, but not the origin's digest of the
    whole object (moto's CRC32): dropped, fetched again from the origin alone, and the
    reader gets the origin's bytes."""
    liar, honest = _liar_and_honest(cluster)
    files = _model(s3, sizes=(10 * BLOCK,))
    key, data = next(iter(files.items()))
    lying = NodeClient(liar.unix_endpoint)
    assert lying.read(lying.stat(s3.url(key)), 0, len(data)) == data  # the liar's own copy
    s3.reset_requests()
    reader = NodeClient(honest.unix_endpoint)
    assert Path(reader.open_local(s3.url(key))).read_bytes() == data
    gets = s3.gets(key)
    assert len(gets) == _blocks(len(data)) and len(set(gets)) == len(gets)  # the origin's
    assert [e.verified for e in reader.cached()] == ["crc32"]

    wait_for(lambda: any("does not match the origin's crc32" in line for line in honest.lines))


def test_a_cluster_copy_is_checked_against_the_digest_when_it_ends(cluster, s3) -> None:
    """A member handed a manifest (versions, no digests) looks the digest up and checks
    its copy before the job ends: it is verified before anyone stats it there."""
    liar, honest = _liar_and_honest(cluster)
    files = _model(s3)
    result = NodeClient(liar.unix_endpoint).prefetch([s3.url("model/")], cluster=True)
    assert result.state == "succeeded", result.error
    entries = NodeClient(honest.unix_endpoint).cached()
    assert {e.url: e.verified for e in entries} == {s3.url(k): "crc32" for k in files}
    _assert_copy(honest, s3, files)


def test_a_node_that_joins_fills_from_peers_not_the_origin(cluster, s3) -> None:
    addresses = _addresses(4)
    first = cluster(addresses[:3])
    files = _model(s3)
    NodeClient(first[0].unix_endpoint).prefetch([s3.url("model/")], cluster=True)
    s3.reset_requests()
    joined = cluster(addresses[3:], members=addresses)[0]
    client = NodeClient(joined.unix_endpoint)
    client.prefetch([s3.url("model/")])
    _assert_copy(joined, s3, files)
    gets = Counter(r.key for r in s3.requests if r.object_get)
    assert not gets, gets
    assert client.status().fetched_bytes == 0


def test_cluster_prefetch_needs_a_cluster(start_node, tmp_path, s3) -> None:
    node = start_node(tmp_path / "c", tcp=False, metrics=False)
    s3.put("x.bin", b"x")
    with pytest.raises(ValueError, match="cluster"):
        NodeClient(node.unix_endpoint).prefetch([s3.url("x.bin")], cluster=True)


def _common_port(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (DNS and EndpointSlices name one port)."""
    for _attempt in range(50):
        port = _free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every host")


def _start_with(start_node, tmp_path, hosts, port, cluster_config):
    nodes = []
    for index, host in enumerate(hosts):
        cache = tmp_path / f"cache-{index}"
        config = tmp_path / f"node-{index}.yaml"
        config.write_text(
            yaml.safe_dump(
                {"cache_dir": str(cache), "block_size": BLOCK, "cluster": cluster_config}
            )
        )
        nodes.append(
            start_node(
                cache,
                config=config,
                tcp=f"{host}:{port}",
                metrics=False,
                socket_path=tmp_path / f"node-{index}.sock",
            )
        )
    return nodes


def _members(node) -> set[str]:
    return set(NodeClient(node.unix_endpoint).status().members)


def test_dns_membership_follows_the_records_without_a_restart(
    start_node, tmp_path, s3, monkeypatch
) -> None:
    from dns_server import DnsServer

    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    port = _common_port(hosts)
    with DnsServer() as dns:
        dns.set("cachefs.test", a=hosts[:2])
        config = {
            "membership": "dns",
            "dns_name": "cachefs.test",
            "dns_port": port,
            "dns_resolver": dns.address,
            "refresh_interval": 0.2,
        }
        nodes = _start_with(start_node, tmp_path, hosts[:2], port, config)
        both = {f"{h}:{port}" for h in hosts[:2]}
        for node in nodes:
            wait_for(lambda n=node: _members(n) == both, timeout=10)
        files = _model(s3, sizes=(6 * BLOCK,))
        key, data = next(iter(files.items()))
        for node in nodes:
            client = NodeClient(node.unix_endpoint)
            assert client.read(client.stat(s3.url(key)), 0, len(data)) == data
        assert len(s3.gets(key)) == 6  # shared: each block from the origin once

        dns.set("cachefs.test", a=hosts)
        wait_for(lambda: len(_members(nodes[0])) == 3, timeout=10)


def test_kubernetes_membership_follows_the_endpoint_slices(
    start_node, tmp_path, s3, monkeypatch
) -> None:
    from k8s_api import KubeApiServer, endpoint_slice

    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    hosts = ["127.0.0.1", "127.0.0.2"]
    port = _common_port(hosts)
    with KubeApiServer("cachefs-system") as api:
        api.put(endpoint_slice("cachefs-a", "cachefs", [(hosts[0], True)], port=port))
        config = {
            "membership": "kubernetes",
            "kubernetes_service": "cachefs",
            "kubernetes_namespace": "cachefs-system",
            "kubernetes_api_url": api.url,
        }
        nodes = _start_with(start_node, tmp_path, hosts, port, config)
        wait_for(lambda: _members(nodes[1]) == {f"{hosts[0]}:{port}"}, timeout=10)
        api.put(endpoint_slice("cachefs-a", "cachefs", [(h, True) for h in hosts], port=port))
        both = {f"{h}:{port}" for h in hosts}
        for node in nodes:
            wait_for(lambda n=node: _members(n) == both, timeout=10)
        files = _model(s3, sizes=(4 * BLOCK,))
        key, data = next(iter(files.items()))
        for node in nodes:
            client = NodeClient(node.unix_endpoint)
            assert client.read(client.stat(s3.url(key)), 0, len(data)) == data
        assert len(s3.gets(key)) == 4
        api.put(
            endpoint_slice("cachefs-a", "cachefs", [(hosts[0], True), (hosts[1], False)], port=port)
        )
        wait_for(lambda: _members(nodes[0]) == {f"{hosts[0]}:{port}"}, timeout=10)


def test_a_cancelled_cluster_prefetch_stops_on_every_member(cluster, s3) -> None:
    nodes = cluster(_addresses(2))
    files = _model(s3, sizes=(64 * BLOCK,))  # more blocks than both nodes' fills at once
    key = next(iter(files))
    coordinator = NodeClient(nodes[0].unix_endpoint)
    with s3.hold_gets(key, min_start=2 * BLOCK) as gate:
        started = coordinator.prefetch([s3.url("model/")], cluster=True, detach=True)
        gate.wait_held()
        coordinator.cancel(started.id)
    with pytest.raises(JobCancelledError, match="cancelled on its 2 nodes"):
        coordinator.wait(started.id)
    member = NodeClient(nodes[1].unix_endpoint)  # its share ran as a job of its own
    wait_for(lambda: [j.state for j in member.status().jobs] == ["cancelled"], 30)
    assert len(set(s3.gets(key))) < 64  # not every block was fetched


def test_each_node_fills_its_own_blocks_first_then_starts_at_its_own_offset() -> None:
    """A cluster prefetch on every node at once: each fills the blocks it owns first
    (the others wait for those), and the rest from an offset of its own, so the nodes
    do not all ask the same few owners for the same blocks at the same moment."""
    from cachefs.node.cluster.hashing import block_key, rank
    from cachefs.node.cluster.membership import StaticMembership
    from cachefs.node.cluster.peers import Peers

    members = ["10.0.0.1:7070", "10.0.0.2:7070", "10.0.0.3:7070"]
    blocks = [("objectid", index) for index in range(300)]
    orders = {}
    for member in members:
        peers = Peers(StaticMembership(members), self_address=member)
        order = peers.fill_order(blocks, key=lambda block: block)
        assert sorted(order) == blocks  # every block, once
        owned = [b for b in blocks if rank(block_key(*b), members)[0] == member]
        assert order[: len(owned)] == owned and 50 < len(owned) < 150
        orders[member] = order[len(owned) :]
    starts = {order[0] for order in orders.values()}
    assert len(starts) == len(members)  # three different places to begin the rest
