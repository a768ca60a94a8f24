"""The CSI node plugin, driven through its real socket, with a real node and real mounts.

Each test runs a ``cachefs node`` and a ``cachefs csi`` process and calls the plugin
as kubelet would (ephemeral inline volumes: Publish and Unpublish only).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import mounts_under
from helpers import Background
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.csi.proto import csi_pb2 as csi
from cachefs.csi.proto import csi_pb2_grpc as csi_grpc

BLOCK = 64 * 1024
KUBELET_POD_INFO = {
    "csi.storage.k8s.io/ephemeral": "true",
    "csi.storage.k8s.io/pod.name": "vllm-0",
    "csi.storage.k8s.io/pod.namespace": "serving",
    "csi.storage.k8s.io/pod.uid": "0b6c1f6e-1b1f-4c5e-9d55-2a1f6c1b0a01",
    "csi.storage.k8s.io/serviceAccount.name": "default",
}


def _node_config(tmp_path: Path, cache: Path, quota: str | None = None) -> Path:
    config = tmp_path / "node.yaml"
    settings: dict[str, object] = {"block_size": BLOCK}
    if quota:
        settings["tiers"] = [{"name": "disk", "path": str(cache), "quota": quota}]
    else:
        settings["cache_dir"] = str(cache)
    config.write_text(yaml.safe_dump(settings))
    return config


@pytest.fixture
def node(start_node, tmp_path, s3):
    cache = tmp_path / "cache"
    return start_node(
        cache,
        config=_node_config(tmp_path, cache),
        tcp=False,
        metrics=False,
        socket_path=tmp_path / "node.sock",
    )


@pytest.fixture
def plugin(start_csi, node, s3):
    return start_csi(node.unix_endpoint, allow=(f"s3://{s3.name}/models/",))


def _stubs(plugin) -> tuple[csi_grpc.NodeStub, csi_grpc.IdentityStub]:
    channel = grpc.insecure_channel(f"unix://{plugin.socket_path}")
    return csi_grpc.NodeStub(channel), csi_grpc.IdentityStub(channel)


def _publish_request(volume_id: str, target: Path, source: str | None = None, **attributes: str):
    """A kubelet's publish of a read-only volume; ``source`` None: no source attribute
    (a volume that names a CachedModel)."""
    capability = csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(),
        access_mode=csi.VolumeCapability.AccessMode(
            mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
        ),
    )
    return csi.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=capability,
        readonly=True,
        volume_context={
            **({} if source is None else {"source": source}),
            **KUBELET_POD_INFO,
            **attributes,
        },
    )


def _unpublish(stub, volume_id: str, target: Path) -> None:
    stub.NodeUnpublishVolume(
        csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)), timeout=30
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _model(s3) -> dict[str, bytes]:
    files = {
        "models/llama/config.json": b'{"hidden_size": 64}',
        "models/llama/model-00001.safetensors": os.urandom(3 * BLOCK + 17),
        "models/llama/tokenizer/tokenizer.json": b'{"vocab": {}}' * 100,
    }
    for key, data in files.items():
        s3.put(key, data)
    return {key.removeprefix("models/llama/"): data for key, data in files.items()}


def _abort_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


@pytest.mark.exercises("--node-id", "--csi-endpoint", "--endpoint")
def test_identity_and_node_info(plugin, node) -> None:
    stub, identity = _stubs(plugin)
    info = identity.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=10)
    assert info.name == "csi.cachefs.dev" and info.vendor_version
    assert identity.Probe(csi.ProbeRequest(), timeout=10).ready.value is True
    assert not identity.GetPluginCapabilities(
        csi.GetPluginCapabilitiesRequest(), timeout=10
    ).capabilities
    assert stub.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=10).node_id == "node-1"
    assert not stub.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest(), timeout=10).capabilities
    node.kill()
    assert identity.Probe(csi.ProbeRequest(), timeout=30).ready.value is False


def test_publish_mounts_the_model_read_only_and_unpublish_releases_it(
    plugin, node, s3, tmp_path
) -> None:
    expected = _model(s3)
    stub, _ = _stubs(plugin)
    target = tmp_path / "pods" / "uid" / "volumes" / "model" / "mount"
    target.parent.mkdir(parents=True)
    request = _publish_request("vol-1", target, s3.url("models/llama/"))
    stub.NodePublishVolume(request, timeout=60)

    assert _files(target) == expected
    with pytest.raises(OSError) as denied:
        (target / "config.json").write_bytes(b"x")
    assert denied.value.errno == errno.EROFS
    with pytest.raises(OSError) as denied:
        (target / "new-file").write_bytes(b"x")
    assert denied.value.errno == errno.EROFS
    client = NodeClient(node.unix_endpoint)
    assert client.status().pins == {"csi:vol-1": 3}

    stub.NodePublishVolume(request, timeout=60)  # the same call again: success, one mount
    assert mounts_under(tmp_path).count(str(target)) == 1

    _unpublish(stub, "vol-1", target)
    assert not target.exists()
    assert client.status().pins == {}
    assert len(client.cached()) == 3  # the data stays cached until evicted
    _unpublish(stub, "vol-1", target)  # again: success
    _unpublish(stub, "never-published", tmp_path / "pods" / "other")


def test_a_conflicting_publish_is_already_exists(plugin, s3, tmp_path) -> None:
    _model(s3)
    s3.put("models/other/model.bin", b"o" * 100)
    stub, _ = _stubs(plugin)
    target = tmp_path / "t1"
    stub.NodePublishVolume(_publish_request("vol-1", target, s3.url("models/llama/")), timeout=60)
    code, _ = _abort_code(
        lambda: stub.NodePublishVolume(
            _publish_request("vol-1", target, s3.url("models/other/")), timeout=60
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = _abort_code(
        lambda: stub.NodePublishVolume(
            _publish_request("vol-1", tmp_path / "t2", s3.url("models/llama/")), timeout=60
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert not (tmp_path / "t2").exists()
    assert _files(target)["config.json"] == b'{"hidden_size": 64}'


@pytest.mark.parametrize(
    ("source", "attributes", "expected"),
    [
        ("s3://{bucket}/private/llama/", {}, grpc.StatusCode.PERMISSION_DENIED),
        ("s3://{bucket}/models-evil/x", {}, grpc.StatusCode.PERMISSION_DENIED),
        ("s3://{bucket}/models/../private/", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("s3://{bucket}/models/missing.bin", {}, grpc.StatusCode.NOT_FOUND),
        ("s3://{bucket}/models/missing/", {}, grpc.StatusCode.NOT_FOUND),
        ("", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("s3://{bucket}/models/llama/", {"sourc": "typo"}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
@pytest.mark.exercises("--allow")
def test_bad_sources_are_refused_and_nothing_is_left(
    plugin, node, s3, tmp_path, source, attributes, expected
) -> None:
    _model(s3)
    stub, _ = _stubs(plugin)
    target = tmp_path / "target"
    request = _publish_request("vol-bad", target, source.format(bucket=s3.name), **attributes)
    code, details = _abort_code(lambda: stub.NodePublishVolume(request, timeout=60))
    assert code == expected, details
    assert details  # says what was wrong
    assert mounts_under(tmp_path) == []
    assert not target.exists()
    assert NodeClient(node.unix_endpoint).status().pins == {}


def test_block_volumes_and_missing_fields_are_invalid(plugin, s3, tmp_path) -> None:
    stub, _ = _stubs(plugin)
    request = _publish_request("vol-b", tmp_path / "b", s3.url("models/llama/"))
    request.volume_capability.block.SetInParent()
    assert _abort_code(lambda: stub.NodePublishVolume(request, timeout=10))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    for broken in (
        csi.NodePublishVolumeRequest(target_path=str(tmp_path / "x")),
        csi.NodePublishVolumeRequest(volume_id="v", target_path="relative/path"),
    ):
        assert _abort_code(lambda b=broken: stub.NodePublishVolume(b, timeout=10))[0] == (
            grpc.StatusCode.INVALID_ARGUMENT
        )


@pytest.mark.exercises("--config")
def test_namespace_rules_use_the_pod_information(start_csi, node, s3, tmp_path) -> None:
    config = tmp_path / "csi.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy": [
                    {
                        "callers": ["namespace:team-a"],
                        "allow": ["view"],
                        "sources": [f"s3://{s3.name}/models/"],
                    }
                ]
            }
        )
    )
    plugin = start_csi(node.unix_endpoint, extra_args=("--config", str(config)))
    _model(s3)
    stub, _ = _stubs(plugin)
    source = s3.url("models/llama/")
    code, details = _abort_code(
        lambda: stub.NodePublishVolume(_publish_request("v1", tmp_path / "a", source), timeout=60)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "serving" in details
    allowed = _publish_request(
        "v2", tmp_path / "b", source, **{"csi.storage.k8s.io/pod.namespace": "team-a"}
    )
    stub.NodePublishVolume(allowed, timeout=60)
    assert (tmp_path / "b" / "config.json").exists()


def test_publish_while_the_node_is_down_is_unavailable_then_succeeds(
    start_node, start_csi, s3, tmp_path
) -> None:
    expected = _model(s3)
    cache = tmp_path / "cache"
    socket_path = tmp_path / "node.sock"
    plugin = start_csi(f"unix://{socket_path}", allow=(f"s3://{s3.name}/models/",))
    stub, _ = _stubs(plugin)
    target = tmp_path / "target"
    request = _publish_request("vol-1", target, s3.url("models/llama/"))
    code, details = _abort_code(lambda: stub.NodePublishVolume(request, timeout=60))
    assert code == grpc.StatusCode.UNAVAILABLE and "cachefs node" in details
    assert mounts_under(tmp_path) == []

    start_node(
        cache,
        config=_node_config(tmp_path, cache),
        tcp=False,
        metrics=False,
        socket_path=socket_path,
    )

    def published() -> bool:  # kubelet retries with a backoff, and so does this
        try:
            stub.NodePublishVolume(request, timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            return False
        return True

    wait_for(published, timeout=30, interval=0.2, message="a publish to succeed")
    assert _files(target) == expected


@pytest.mark.exercises("--publish-timeout")
def test_a_slow_prefetch_answers_aborted_with_progress_and_goes_on(
    start_csi, node, s3, tmp_path
) -> None:
    _model(s3)
    plugin = start_csi(node.unix_endpoint, allow=(f"s3://{s3.name}/models/",), publish_timeout=1.0)
    stub, _ = _stubs(plugin)
    target = tmp_path / "target"
    request = _publish_request("vol-slow", target, s3.url("models/llama/"))
    with s3.hold_gets("models/llama/model-00001.safetensors") as gate:
        code, details = _abort_code(lambda: stub.NodePublishVolume(request, timeout=60))
        gate.wait_held(count=1, timeout=30)  # the prefetch goes on after the answer
    assert code == grpc.StatusCode.ABORTED
    assert "prefetching" in details and " of " in details and "llama" in details
    assert mounts_under(tmp_path) == []
    stub.NodePublishVolume(request, timeout=60)  # kubelet's retry: now it is local
    assert (target / "model-00001.safetensors").stat().st_size == 3 * BLOCK + 17


def test_eviction_pressure_never_removes_a_published_file(
    start_node, start_csi, s3, tmp_path
) -> None:
    cache = tmp_path / "cache"
    node = start_node(
        cache,
        config=_node_config(tmp_path, cache, quota="1MiB"),
        tcp=False,
        metrics=False,
        socket_path=tmp_path / "node.sock",
    )
    plugin = start_csi(node.unix_endpoint, allow=(f"s3://{s3.name}/models/",))
    expected = _model(s3)
    stub, _ = _stubs(plugin)
    target = tmp_path / "target"
    stub.NodePublishVolume(_publish_request("vol-1", target, s3.url("models/llama/")), timeout=60)
    fs_client = NodeClient(node.unix_endpoint)
    for index in range(6):  # 6 x 192 KiB through a 1 MiB quota that holds ~260 KiB pinned
        s3.put(f"other/{index}.bin", os.urandom(3 * BLOCK))
        fs_client.read(fs_client.stat(s3.url(f"other/{index}.bin")), 0, 3 * BLOCK)
    usage = fs_client.status().tiers[0]
    assert usage.evictions >= 1
    assert _files(target) == expected
    model = [e for e in fs_client.cached() if "/models/llama/" in e.url]
    assert len(model) == 3
    assert all(e.complete and e.pinned_by == ("csi:vol-1",) for e in model)
    # Still the store's own file: the view's link and the object's data file.
    assert (target / "model-00001.safetensors").stat().st_nlink == 2


@pytest.mark.exercises("--state-dir")
def test_a_restarted_plugin_keeps_live_volumes_and_cleans_stale_ones(
    start_csi, node, s3, tmp_path
) -> None:
    expected = _model(s3)
    plugin = start_csi(node.unix_endpoint, allow=(f"s3://{s3.name}/models/",))
    stub, _ = _stubs(plugin)
    live, stale = tmp_path / "live", tmp_path / "stale"
    stub.NodePublishVolume(_publish_request("vol-live", live, s3.url("models/llama/")), timeout=60)
    stub.NodePublishVolume(
        _publish_request("vol-stale", stale, s3.url("models/llama/")), timeout=60
    )
    client = NodeClient(node.unix_endpoint)
    assert set(client.status().pins) == {"csi:vol-live", "csi:vol-stale"}

    plugin.kill()
    subprocess.run(["umount", str(stale)], check=True)  # its pod left while the plugin was down
    reader = Background(lambda: _files(live))  # the live volume reads on meanwhile
    assert reader.join() == expected

    again = start_csi(node.unix_endpoint, allow=(f"s3://{s3.name}/models/",))
    assert set(client.status().pins) == {"csi:vol-live"}
    assert _files(live) == expected
    stub, _ = _stubs(again)
    _unpublish(stub, "vol-live", live)
    assert mounts_under(tmp_path) == [] and client.status().pins == {}


def test_sigterm_stops_the_plugin_and_leaves_volumes_mounted(plugin, s3, tmp_path) -> None:
    expected = _model(s3)
    stub, _ = _stubs(plugin)
    target = tmp_path / "target"
    stub.NodePublishVolume(_publish_request("vol-1", target, s3.url("models/llama/")), timeout=60)
    plugin.signal(signal.SIGTERM)
    assert plugin.wait_exit(timeout=30) == 0
    assert _files(target) == expected
