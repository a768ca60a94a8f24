"""A node restarts under its clients: readers resume, views stay readable, pins survive.

Real ``cachefs node`` and ``cachefs csi`` processes are killed (SIGKILL) or stopped
(SIGTERM) and started again on the same cache directory and socket, as a crash or a
rolling upgrade does, while clients read. A reader mid-stream ends with exactly the
origin's bytes, or with an error that says why: the node stayed away longer than the
reconnect grace, or the object changed at the origin meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import mounts_under
from daemon import run_cli
from helpers import Background
from servers import wait_for

from cachefs.client import RECONNECT_GRACE_ENV, NodeClient
from cachefs.csi.proto import csi_pb2 as csi
from cachefs.csi.proto import csi_pb2_grpc as csi_grpc
from cachefs.errors import NodeUnavailableError, VersionChangedError

MiB = 1024 * 1024
BLOCK = MiB  # the client asks for 1 MiB chunks: one block per message
POD_INFO = {
    "csi.storage.k8s.io/ephemeral": "true",
    "csi.storage.k8s.io/pod.name": "vllm-0",
    "csi.storage.k8s.io/pod.namespace": "serving",
    "csi.storage.k8s.io/serviceAccount.name": "default",
}


def _config(tmp_path: Path, cache: Path, **server: object) -> Path:
    """A node config with 1 MiB blocks and no read-ahead: what is cached is what was read."""
    path = tmp_path / "node.yaml"
    settings = {"cache_dir": str(cache), "block_size": BLOCK, "readahead_blocks": 0}
    path.write_text(yaml.safe_dump({**settings, "server": server}))
    return path


def _pins(endpoint: str) -> dict[str, int]:
    """The node's pins as ``cachefs status --json`` shows them."""
    result = run_cli("status", "--endpoint", endpoint, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])["pins"]


def _half_read(node, s3, key: str, data: bytes, grace: float | None) -> tuple:
    """A client that read the first two blocks of ``key`` (so the node caches them)."""
    client = NodeClient(node.unix_endpoint, reconnect_grace=grace)
    info = client.stat(s3.url(key))
    assert client.read(info, 0, 2 * BLOCK) == data[: 2 * BLOCK]
    return client, info


def _reader_at_the_third_block(client, info, data: bytes, gate) -> tuple[Background, bytearray]:
    """A whole-object read that has received the two cached blocks and waits, in the
    node, for the third from the origin (held at ``gate``)."""
    buffer = bytearray(len(data))
    reader = Background(lambda: client.readinto(info, 0, memoryview(buffer)))
    wait_for(
        lambda: buffer[: 2 * BLOCK] == data[: 2 * BLOCK],
        timeout=30,
        message="the two cached blocks to reach the reader",
    )
    gate.wait_held()
    return reader, buffer


# -- a reader mid-stream --------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_a_reader_mid_stream_resumes_at_its_byte_on_the_restarted_node(
    start_node, tmp_path, s3, caplog, stop
) -> None:
    cache, socket_path = tmp_path / "cache", tmp_path / "node.sock"
    config = _config(tmp_path, cache, shutdown_grace=1)
    node = start_node(cache, config=config, socket_path=socket_path)
    data = os.urandom(4 * BLOCK)
    s3.put("weights.bin", data)
    client, info = _half_read(node, s3, "weights.bin", data, grace=120)

    with s3.hold_gets("weights.bin") as gate:
        reader, buffer = _reader_at_the_third_block(client, info, data, gate)
        if stop == signal.SIGKILL:
            node.kill()
        else:
            node.signal(signal.SIGTERM)  # its drain (1 s) ends the held read
        wait_for(
            lambda: "went away while reading" in caplog.text,
            timeout=30,
            message="the reader to lose the node",
        )
        restarted = start_node(cache, config=config, socket_path=socket_path)
        assert not reader.done.is_set(), reader.error  # it waited for the node
    assert reader.join(timeout=60) is None
    assert bytes(buffer) == data
    # The new node sent exactly the two blocks the reader still lacked.
    assert sum(NodeClient(restarted.unix_endpoint).status().served_bytes.values()) == 2 * BLOCK
    assert f"resuming at byte {2 * BLOCK} of version {info.version}" in caplog.text
    if stop == signal.SIGTERM:
        assert node.wait_exit(timeout=60) == 0


def test_a_reader_never_splices_two_versions_across_a_restart(start_node, tmp_path, s3) -> None:
    cache, socket_path = tmp_path / "cache", tmp_path / "node.sock"
    config = _config(tmp_path, cache)
    node = start_node(cache, config=config, socket_path=socket_path)
    data = os.urandom(4 * BLOCK)
    s3.put("weights.bin", data)
    client, info = _half_read(node, s3, "weights.bin", data, grace=120)

    with s3.hold_gets("weights.bin") as gate:
        reader, buffer = _reader_at_the_third_block(client, info, data, gate)
        node.kill()
        s3.put("weights.bin", os.urandom(len(data)))  # a new version while the node is down
        start_node(cache, config=config, socket_path=socket_path)
    error = reader.outcome(timeout=60)
    assert isinstance(error, VersionChangedError), error
    assert info.version in str(error)
    assert buffer[2 * BLOCK :] == bytes(2 * BLOCK)  # not one byte of the new version


# -- a node that stays away ---------------------------------------------------------------


def test_a_node_down_past_the_grace_is_a_clear_error(start_node, tmp_path, s3, monkeypatch) -> None:
    cache = tmp_path / "cache"
    node = start_node(cache, config=_config(tmp_path, cache), socket_path=tmp_path / "n.sock")
    data = os.urandom(4 * BLOCK)
    s3.put("weights.bin", data)
    monkeypatch.setenv(RECONNECT_GRACE_ENV, "1")
    client, info = _half_read(node, s3, "weights.bin", data, grace=None)
    assert client.reconnect_grace == 1

    with s3.hold_gets("weights.bin") as gate:
        reader, _ = _reader_at_the_third_block(client, info, data, gate)
        node.kill()
        error = reader.outcome(timeout=60)
    assert isinstance(error, NodeUnavailableError), error
    message = str(error)
    assert f"the cachefs node at {node.unix_endpoint} has been unreachable for" in message
    assert RECONNECT_GRACE_ENV in message and "`cachefs node` runs there" in message

    # An idempotent call waits the same way and says the same; a prefetch (a new job)
    # is not sent twice, and fails at once.
    with pytest.raises(NodeUnavailableError, match="has been unreachable for"):
        client.stat(s3.url("weights.bin"))
    with pytest.raises(NodeUnavailableError) as prefetch:
        client.prefetch([s3.url("weights.bin")], detach=True)
    assert "unreachable for" not in str(prefetch.value)

    # A client that never reached the node does not wait: a wrong endpoint shows at once.
    never = Background(lambda: NodeClient(node.unix_endpoint, reconnect_grace=600).status())
    assert isinstance(never.outcome(timeout=30), NodeUnavailableError)
    # Nor does one with the grace turned off.
    restarted = start_node(cache, config=_config(tmp_path, cache), socket_path=node.socket_path)
    client, info = _half_read(restarted, s3, "weights.bin", data, grace=0)
    with s3.hold_gets("weights.bin") as gate:
        reader, _ = _reader_at_the_third_block(client, info, data, gate)
        restarted.kill()
        error = reader.outcome(timeout=30)
    assert isinstance(error, NodeUnavailableError) and "unreachable for" not in str(error)


def test_a_bad_reconnect_grace_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.setenv(RECONNECT_GRACE_ENV, "soon")
    with pytest.raises(ValueError, match=RECONNECT_GRACE_ENV):
        NodeClient("unix:///nonexistent/cachefs.sock")
    with pytest.raises(ValueError, match="reconnect_grace"):
        NodeClient("unix:///nonexistent/cachefs.sock", reconnect_grace=-1)


# -- a CSI volume while the node and the plugin restart -------------------------------------


def _csi_stub(plugin) -> csi_grpc.NodeStub:
    return csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{plugin.socket_path}"))


def _publish(stub: csi_grpc.NodeStub, volume_id: str, target: Path, source: str) -> None:
    capability = csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(),
        access_mode=csi.VolumeCapability.AccessMode(
            mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
        ),
    )
    request = csi.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=capability,
        readonly=True,
        volume_context={"source": source, **POD_INFO},
    )
    stub.NodePublishVolume(request, timeout=120)


def _unpublish(stub: csi_grpc.NodeStub, volume_id: str, target: Path) -> None:
    request = csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    stub.NodeUnpublishVolume(request, timeout=120)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.mark.exercises("CACHEFS_RECONNECT_GRACE")
def test_a_csi_volume_stays_readable_while_the_node_and_the_plugin_restart(
    start_node, start_csi, tmp_path, s3
) -> None:
    expected = {"config.json": b'{"hidden_size": 64}', "model.safetensors": os.urandom(3 * BLOCK)}
    for name, data in expected.items():
        s3.put(f"models/m/{name}", data)
    cache, node_socket = tmp_path / "cache", tmp_path / "node.sock"
    config = _config(tmp_path, cache)
    node = start_node(cache, config=config, tcp=False, metrics=False, socket_path=node_socket)
    allow = (f"s3://{s3.name}/models/",)
    plugin = start_csi(node.unix_endpoint, allow=allow, env={RECONNECT_GRACE_ENV: "120"})
    stub = _csi_stub(plugin)
    kept, released = tmp_path / "kept", tmp_path / "released"
    _publish(stub, "vol-kept", kept, s3.url("models/m/"))
    _publish(stub, "vol-released", released, s3.url("models/m/"))
    weights = (kept / "model.safetensors").open("rb")  # a server holding its file open
    assert weights.read(BLOCK) == expected["model.safetensors"][:BLOCK]

    node.kill()
    assert _files(kept) == expected  # the view is the node's files: no node needed
    # kubelet unpublishes a volume while the node is down: the plugin waits for it.
    unpublish = Background(lambda: _unpublish(stub, "vol-released", released))
    node = start_node(cache, config=config, tcp=False, metrics=False, socket_path=node_socket)
    assert unpublish.outcome(timeout=120) is None
    assert any("asking again (Unpin) for up to 120 s" in line for line in plugin.lines)

    # Both restart at once, as when their pod does.
    plugin.kill()
    node.kill()
    assert _files(kept) == expected
    node = start_node(cache, config=config, tcp=False, metrics=False, socket_path=node_socket)
    plugin = start_csi(node.unix_endpoint, allow=allow)
    assert weights.read() == expected["model.safetensors"][BLOCK:]
    weights.close()
    assert _files(kept) == expected
    assert _pins(node.unix_endpoint) == {"csi:vol-kept": 2}  # and the released one is gone

    _unpublish(_csi_stub(plugin), "vol-kept", kept)
    assert mounts_under(tmp_path) == [] and _pins(node.unix_endpoint) == {}


# -- a rolling upgrade -----------------------------------------------------------------------


def test_a_rolling_upgrade_keeps_the_cache_the_pins_and_the_readers(
    start_node, tmp_path, s3
) -> None:
    cache, socket_path = tmp_path / "cache", tmp_path / "node.sock"
    config = _config(tmp_path, cache, shutdown_grace=60)
    model = {"model/a.bin": os.urandom(3 * BLOCK), "model/b.bin": os.urandom(BLOCK + 17)}
    for key, data in model.items():
        s3.put(key, data)
    cold = os.urandom(2 * BLOCK)
    s3.put("cold.bin", cold)
    old = start_node(cache, config=config, socket_path=socket_path)
    endpoint = old.unix_endpoint
    fetched = run_cli(
        "prefetch", "--pin", "--holder", "job:model", "--endpoint", endpoint, s3.url("model/")
    )
    assert fetched.returncode == 0, fetched.stderr
    s3.reset_requests()

    client = NodeClient(endpoint, reconnect_grace=120)
    info = client.stat(s3.url("model/a.bin"))
    assert client.read(info, 0, BLOCK) == model["model/a.bin"][:BLOCK]
    with s3.hold_gets("cold.bin") as gate:
        # A read the old node is still serving when it is told to stop: its drain
        # lets it finish, while the new node already serves on the same socket.
        last = Background(lambda: client.read(client.stat(s3.url("cold.bin")), 0, len(cold)))
        gate.wait_held()
        old.signal(signal.SIGTERM)
        wait_for(lambda: any("draining" in line for line in old.lines), timeout=30)
        new = start_node(cache, config=config, socket_path=socket_path)
        rest = Background(lambda: client.read(info, BLOCK, info.size))
    assert last.join(timeout=60) == cold
    assert old.wait_exit(timeout=60) == 0
    assert rest.join(timeout=120) == model["model/a.bin"][BLOCK:]

    # The old node is gone and left the new one's socket alone: new clients reach the
    # new node, which has the old one's pins and cache.
    assert new.process.poll() is None
    assert _pins(endpoint) == {"job:model": 2}
    fresh = NodeClient(endpoint)
    for key, data in model.items():
        assert fresh.read(fresh.stat(s3.url(key)), 0, len(data)) == data
        assert s3.gets(key) == []  # served from the cache the old node filled
    assert fresh.status().fetched_bytes == 0
