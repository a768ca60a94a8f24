"""CSI volumes that name a CachedModel, through the plugin's real socket.

A ``cachefs node`` reconciles CachedModels of the Kubernetes API stand-in (the CRD
checks every write); a ``cachefs csi`` plugin is called as kubelet calls it, with the
pod's namespace in the volume context (``podInfoOnMount``). A volume that names a
model mounts exactly the version the node filled for it, never a fresh resolve of the
source, and keeps it while a new version rolls out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import REPO_ROOT, mounts_under
from k8s_api import KubeApiServer
from kubernetes import client
from servers import wait_for
from test_csi import KUBELET_POD_INFO, _abort_code, _files, _publish_request, _stubs, _unpublish

from cachefs.client import NodeClient
from cachefs.node.models.spec import GROUP, PLURAL, VERSION

BLOCK = 64 * 1024
NAMESPACE = KUBELET_POD_INFO["csi.storage.k8s.io/pod.namespace"]


@pytest.fixture
def models(start_node, start_csi, tmp_path: Path, s3) -> Iterator[dict[str, Any]]:
    """A node that reconciles the stand-in's CachedModels, and a plugin in front of it
    that lets every pod view ``models/`` of the bucket."""
    crd = yaml.safe_load(
        (REPO_ROOT / "charts/cachefs/crds/cachedmodels.cachefs.io.yaml").read_text()
    )
    with KubeApiServer("cachefs", crds=[crd]) as api:
        api.nodes["node-1"] = {"pool": "gpu"}
        config = tmp_path / "node.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "cache_dir": str(tmp_path / "cache"),
                    "block_size": BLOCK,
                    "revalidate_after": 0,  # a fresh resolve would see the origin's change
                    "cluster": {"kubernetes_api_url": api.url},
                    "models": {"enabled": True, "resync": 0.5},
                }
            )
        )
        env = {**s3.env(), "NODE_NAME": "node-1", "POD_NAMESPACE": "cachefs"}
        node = start_node(
            tmp_path / "cache",
            config=config,
            tcp=False,
            metrics=False,
            socket_path=tmp_path / "node.sock",
            env=env,
        )
        plugin = start_csi(
            node.unix_endpoint, allow=(f"s3://{s3.name}/models/",), publish_timeout=2.0
        )
        configuration = client.Configuration()
        configuration.host = api.url
        objects = client.CustomObjectsApi(client.ApiClient(configuration))
        yield {"api": api, "node": node, "plugin": plugin, "objects": objects}


def _create(models: dict[str, Any], name: str, source: str, namespace: str = NAMESPACE, **spec):
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CachedModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": source, **spec},
    }
    models["objects"].create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def _publish(stub: Any, request: Any) -> None:
    """Publish as kubelet does: again after each ABORTED, until it succeeds."""

    def published() -> bool:
        try:
            stub.NodePublishVolume(request, timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
            return False
        return True

    wait_for(published, timeout=60, interval=0.2, message=f"{request.volume_id} to publish")


def _node_entry(models: dict[str, Any], name: str) -> dict[str, Any]:
    obj = models["api"].get(NAMESPACE, name) or {}
    entries = (obj.get("status") or {}).get("nodes") or [{}]
    return entries[0]


def _pins(models: dict[str, Any]) -> dict[str, int]:
    return NodeClient(models["node"].unix_endpoint).status().pins


def test_a_volume_mounts_the_version_the_node_filled_and_keeps_it(models, s3, tmp_path) -> None:
    old = {"config.json": b'{"layers": 2}', "model.safetensors": os.urandom(3 * BLOCK + 5)}
    for name, data in old.items():
        s3.put(f"models/llama/{name}", data)
    _create(models, "llama", s3.url("models/llama/"))
    stub, _ = _stubs(models["plugin"])

    first = tmp_path / "pod-1"
    _publish(stub, _publish_request("vol-1", first, cachedModel="llama"))  # waits for the fill
    assert _files(first) == old
    version = _node_entry(models, "llama")["version"]
    record = json.loads((first / ".view.json").read_text())
    assert record["holder"] == "csi:vol-1"
    assert _pins(models) == {"csi:vol-1": 2, f"model:{NAMESPACE}/llama@{version}": 2}

    # The origin changes; the model is Pinned: a new volume still gets the version
    # the node filled, not what a fresh resolve of the source would give now.
    new_weights = os.urandom(3 * BLOCK + 9)
    s3.put("models/llama/model.safetensors", new_weights)
    second = tmp_path / "pod-2"
    _publish(stub, _publish_request("vol-2", second, cachedModel="llama"))
    assert _files(second) == old

    # A rollout (the spec now follows the origin): the node fills the new version
    # beside the old; mounted volumes keep their files, a new volume gets the new one.
    models["objects"].patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "llama", {"spec": {"updatePolicy": "Latest"}}
    )

    def new_version_ready() -> str | None:
        entry = _node_entry(models, "llama")
        ready = entry.get("phase") == "Ready" and entry.get("version") != version
        return entry["version"] if ready else None

    rolled = wait_for(new_version_ready, timeout=60, message="the new version on the node")
    third = tmp_path / "pod-3"
    _publish(stub, _publish_request("vol-3", third, cachedModel="llama"))
    assert _files(third) == {**old, "model.safetensors": new_weights}
    assert _files(first) == _files(second) == old
    pins = _pins(models)
    assert pins[f"model:{NAMESPACE}/llama@{rolled}"] == 2
    assert f"model:{NAMESPACE}/llama@{version}" not in pins  # released by the model...
    assert pins["csi:vol-1"] == pins["csi:vol-2"] == 2  # ...held by the volumes

    _publish(stub, _publish_request("vol-1", first, cachedModel="llama"))  # kubelet again: no-op
    assert _files(first) == old
    code, details = _abort_code(
        lambda: stub.NodePublishVolume(
            _publish_request("vol-1", first, source=s3.url("models/llama/")), timeout=30
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "CachedModel" in details
    for volume, target in (("vol-1", first), ("vol-2", second), ("vol-3", third)):
        _unpublish(stub, volume, target)
    assert set(_pins(models)) == {f"model:{NAMESPACE}/llama@{rolled}"}


def test_what_a_model_volume_cannot_mount_is_refused_and_nothing_is_left(
    models, s3, tmp_path
) -> None:
    s3.put("models/llama/model.bin", os.urandom(BLOCK))
    s3.put("private/secret/model.bin", os.urandom(BLOCK))
    _create(models, "llama", s3.url("models/llama/"))
    _create(models, "elsewhere", s3.url("models/llama/"), namespace="team-b")
    _create(models, "secret", s3.url("private/secret/"))  # the pod may not view it
    _create(models, "cpu-only", s3.url("models/llama/"), nodeSelector={"pool": "cpu"})
    _create(models, "missing", s3.url("models/missing/"))  # never resolves: never ready
    stub, _ = _stubs(models["plugin"])
    no_pod_info = {k: v for k, v in KUBELET_POD_INFO.items() if not k.endswith("namespace")}
    target = tmp_path / "target"
    cases = [
        (
            {"cachedModel": "llama", "source": s3.url("models/llama/")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "not both",
        ),
        ({"cachedModel": "llama", "tier": "disk"}, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        ({"cachedModel": "../llama"}, grpc.StatusCode.INVALID_ARGUMENT, "not a CachedModel name"),
        ({"cachedModel": "Llama"}, grpc.StatusCode.INVALID_ARGUMENT, "not a CachedModel name"),
        ({"cachedModel": ""}, grpc.StatusCode.INVALID_ARGUMENT, "not a CachedModel name"),
        ({"cachedModel": "nope"}, grpc.StatusCode.NOT_FOUND, f"in namespace {NAMESPACE}"),
        ({"cachedModel": "elsewhere"}, grpc.StatusCode.NOT_FOUND, f"in namespace {NAMESPACE}"),
        ({"cachedModel": "secret"}, grpc.StatusCode.PERMISSION_DENIED, "may not view"),
        ({"cachedModel": "cpu-only"}, grpc.StatusCode.FAILED_PRECONDITION, "nodeSelector"),
        ({"cachedModel": "missing"}, grpc.StatusCode.ABORTED, "not ready on this node yet"),
    ]
    for attributes, expected, words in cases:
        request = _publish_request("vol-bad", target, **attributes)
        code, details = _abort_code(lambda r=request: stub.NodePublishVolume(r, timeout=30))
        assert (code, words in details) == (expected, True), (attributes, details)
    request = _publish_request("vol-bad", target, cachedModel="llama")
    del request.volume_context["csi.storage.k8s.io/pod.namespace"]
    assert set(request.volume_context) == {*no_pod_info, "cachedModel"}
    code, details = _abort_code(lambda: stub.NodePublishVolume(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "podInfoOnMount" in details
    assert mounts_under(tmp_path) == []
    assert not target.exists()
    assert not [h for h in _pins(models) if h.startswith("csi:")]


def test_a_node_without_models_says_so(start_node, start_csi, s3, tmp_path) -> None:
    node = start_node(tmp_path / "cache", tcp=False, metrics=False)
    plugin = start_csi(node.unix_endpoint, allow=(f"s3://{s3.name}/models/",))
    stub, _ = _stubs(plugin)
    request = _publish_request("vol-1", tmp_path / "target", cachedModel="llama")
    code, details = _abort_code(lambda: stub.NodePublishVolume(request, timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not reconcile CachedModels" in details and "source" in details
    assert mounts_under(tmp_path) == []
