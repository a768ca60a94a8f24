"""Peers that fail without dying: one that accepts and never answers, and one cut off
by a network partition. Each costs at most ``peer_timeout`` per block before the
next source, then is avoided for ``backoff`` seconds, which the metrics show.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import TOKEN, loopback_addresses
from servers import wait_for

from cachefs.client import NodeClient

BLOCK = 64 * 1024
CONCURRENCY = 4


class SilentPeer:
    """A TCP listener that accepts every connection and never sends a byte."""

    def __init__(self, host: str) -> None:
        self._listener = socket.create_server((host, 0))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read, never answered

    def close(self) -> None:
        self._listener.close()
        for conn in self.accepted:
            conn.close()


def _unreachable(node: Any, peer: str) -> float:
    """Failed fetches from ``peer`` that timed out or found it unreachable."""
    return sum(
        node.metric("cachefs_peer_errors_total", peer=peer, kind=kind)
        for kind in ("TimeoutError", "NodeUnavailableError", "PeerUnreachableError")
    )


def _node(start_node: Any, tmp_path: Path, address: str, members: list[str], **kw: Any) -> Any:
    cache = tmp_path / f"cache-{address.replace(':', '-')}"
    config = tmp_path / f"node-{address.replace(':', '-')}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cache_dir": str(cache),
                "block_size": BLOCK,
                "concurrency": CONCURRENCY,
                "cluster": {
                    "membership": "static",
                    "peers": members,
                    "peer_timeout": 1,
                    "backoff": 3600,
                },
            }
        )
    )
    return start_node(cache, config=config, tcp=address, **kw)


def _read_all(node: Any, url: str) -> bytes:
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    try:
        info = client.stat(url)
        return client.read(info, 0, info.size)
    finally:
        client.close()


def test_a_peer_that_never_answers_costs_one_timeout_then_is_avoided(
    start_node, tmp_path, s3, monkeypatch
) -> None:
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    (address,) = loopback_addresses(1)
    silent = SilentPeer("127.0.0.2")
    try:
        node = _node(start_node, tmp_path, address, [address, silent.address], env=s3.env())
        first, second = os.urandom(16 * BLOCK), os.urandom(16 * BLOCK)
        s3.put("m/first.bin", first)
        s3.put("m/second.bin", second)

        assert _read_all(node, s3.url("m/first.bin")) == first
        waited = node.metric("cachefs_peer_errors_total", peer=silent.address)
        # Only the fills already waiting on it when the first timed out paid the timeout:
        # the pool's and the reader's own.
        assert 1 <= waited <= CONCURRENCY + 1
        assert _unreachable(node, silent.address) == waited  # no data error among them
        assert node.metric("cachefs_peer_backoff", peer=silent.address) == 1
        assert silent.accepted  # it was asked, and said nothing

        assert _read_all(node, s3.url("m/second.bin")) == second
        assert node.metric("cachefs_peer_errors_total", peer=silent.address) == waited
        # Every block came from the origin, once.
        assert len(set(s3.gets("m/first.bin"))) == len(s3.gets("m/first.bin")) == 16
    finally:
        silent.close()


# -- a partition: the peer's network goes away -------------------------------------


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def partitioned_pair() -> Iterator[dict[str, str]]:
    """A network namespace joined to this one by a veth pair: this side 10.231.N.1,
    the far side 10.231.N.2. ``cut()`` takes the far side's link down, so packets to
    it vanish (no answer, no reset): a partition."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    name = f"cfs-{uuid.uuid4().hex[:6]}"
    net = int(uuid.uuid4().hex[:2], 16) % 250 + 1
    here, there = f"{name}-a", f"{name}-b"
    try:
        _run("ip", "netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot make a network namespace here: {exc}")
    try:
        _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _run("ip", "link", "set", there, "netns", name)
        _run("ip", "addr", "add", f"10.231.{net}.1/30", "dev", here)
        _run("ip", "link", "set", here, "up")
        _run("ip", "-n", name, "addr", "add", f"10.231.{net}.2/30", "dev", there)
        _run("ip", "-n", name, "link", "set", there, "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield {
            "namespace": name,
            "here": f"10.231.{net}.1",
            "there": f"10.231.{net}.2",
            "far_link": there,
        }
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def test_a_partitioned_peer_costs_one_timeout_then_is_avoided(
    start_node, tmp_path, s3, partitioned_pair, monkeypatch
) -> None:
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    pair = partitioned_pair
    here = f"{pair['here']}:{_free_port(pair['here'])}"
    there = f"{pair['there']}:17071"
    members = [here, there]
    node = _node(start_node, tmp_path, here, members, env=s3.env())
    # The far node runs inside the namespace, on its own cache.
    far = _far_node(tmp_path, pair["namespace"], there, members)
    try:
        wait_for(lambda: _serving(there), 30, message="the far node to listen")
        _run("ip", "-n", pair["namespace"], "link", "set", pair["far_link"], "down")

        data = os.urandom(16 * BLOCK)
        s3.put("m/p.bin", data)
        assert _read_all(node, s3.url("m/p.bin")) == data
        waited = node.metric("cachefs_peer_errors_total", peer=there)
        assert 1 <= waited <= CONCURRENCY + 1
        assert _unreachable(node, there) == waited
        assert node.metric("cachefs_peer_backoff", peer=there) == 1
        assert len(s3.gets("m/p.bin")) == 16  # each block from the origin once
    finally:
        far.kill()
        far.wait(timeout=30)


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _far_node(tmp_path: Path, namespace: str, address: str, members: list[str]) -> Any:
    config = tmp_path / "far.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cache_dir": str(tmp_path / "far-cache"),
                "block_size": BLOCK,
                "cluster": {"membership": "static", "peers": members},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env["CACHEFS_TOKEN"] = TOKEN
    return subprocess.Popen(
        [
            "ip", "netns", "exec", namespace,
            sys.executable, "-m", "cachefs.cli", "node",
            "--config", str(config),
            "--socket", str(tmp_path / "far.sock"),
            "--address", address,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _serving(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False
