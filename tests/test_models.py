"""CachedModels reconciled by real nodes against the Kubernetes API stand-in.

Three ``cachefs node`` processes form a cluster on loopback; two carry the label a
model selects. Models are created, changed and deleted through the official
``kubernetes`` client, as ``kubectl`` would; the nodes fill them, pin them, report
their own entries of the status, and one of them (the Lease's holder) writes the
aggregate. The S3 origin (moto) counts every GET.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT
from daemon import TOKEN, NodeProcess, loopback_addresses
from k8s_api import KubeApiServer
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.node.labels import label_key
from cachefs.node.models.spec import FINALIZER, GROUP, PLURAL, VERSION

BLOCK = 64 * 1024
NAMESPACE = "team-a"
NODES = {"node-a": {"pool": "gpu"}, "node-b": {"pool": "gpu"}, "node-c": {"pool": "cpu"}}


@pytest.fixture
def cluster(request, start_node, tmp_path: Path, s3, monkeypatch) -> Iterator[dict[str, Any]]:
    """The nodes of NODES, all started but those a test names as its parameter
    (``cluster["start"](name)`` starts one later); every one a static member."""
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    crd = yaml.safe_load(
        (REPO_ROOT / "charts/cachefs/crds/cachedmodels.cachefs.io.yaml").read_text()
    )
    with KubeApiServer("cachefs", crds=[crd]) as api:  # every write checked by the CRD
        api.nodes.update({name: dict(labels) for name, labels in NODES.items()})
        addresses = dict(zip(NODES, loopback_addresses(len(NODES)), strict=True))
        nodes: dict[str, NodeProcess] = {}

        def start(name: str) -> NodeProcess:
            config = tmp_path / f"{name}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "cache_dir": str(tmp_path / name),
                        "block_size": BLOCK,
                        "revalidate_after": 1,  # Latest models see a change soon
                        "cluster": {
                            "membership": "static",
                            "peers": list(addresses.values()),
                            "kubernetes_api_url": api.url,
                            "label_node": True,
                        },
                        "models": {"enabled": True, "resync": 0.5},
                    }
                )
            )
            env = {**s3.env(), "NODE_NAME": name, "POD_NAMESPACE": "cachefs"}
            nodes[name] = start_node(tmp_path / name, config=config, tcp=addresses[name], env=env)
            return nodes[name]

        for name in NODES:
            if name not in getattr(request, "param", ()):
                start(name)
        configuration = client.Configuration()
        configuration.host = api.url
        objects = client.CustomObjectsApi(client.ApiClient(configuration))
        yield {"api": api, "nodes": nodes, "objects": objects, "start": start}


def _model(name: str, source: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CachedModel",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"source": source, "nodeSelector": {"pool": "gpu"}, **spec},
    }


def _get(cluster: dict[str, Any], name: str) -> dict[str, Any] | None:
    try:
        return cluster["objects"].get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or ():
        if condition.get("type") == kind:
            return condition
    return {}


def _ready(cluster: dict[str, Any], name: str, version: str | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = _get(cluster, name)
        status = (obj or {}).get("status") or {}
        if _condition(obj, "Ready").get("status") != "True":
            return None
        if version is not None and (status.get("resolved") or {}).get("version") == version:
            return None  # still the old one
        return obj

    return wait_for(check, timeout=90, message=f"model {name} to be Ready")


def _leader(cluster: dict[str, Any]) -> str:
    """The node that holds the models' Lease (it writes the aggregate)."""
    lease = wait_for(
        lambda: cluster["api"].get("cachefs", "cachefs-models", plural="leases"),
        timeout=30,
        message="a model leader",
    )
    return str(lease["spec"]["holderIdentity"])


def _entries(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ((obj or {}).get("status") or {}).get("nodes") or ()}


def _pins(node: NodeProcess) -> dict[str, int]:
    return NodeClient(node.unix_endpoint, token="", tls_ca="").status().pins


def test_a_model_is_filled_on_the_nodes_it_selects_and_turns_ready(cluster, s3) -> None:
    files = {f"llama/shard-{i}.bin": os.urandom(3 * BLOCK + i) for i in range(3)}
    for key, data in files.items():
        s3.put(key, data)
    cluster["objects"].create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, _model("llama", s3.url("llama/"))
    )
    obj = _ready(cluster, "llama")
    status = obj["status"]
    assert status["readyNodes"] == status["desiredNodes"] == 2
    assert status["ready"] == "2/2"
    assert status["resolved"]["objects"] == 3
    assert status["resolved"]["bytes"] == sum(len(d) for d in files.values())
    assert sorted(e["name"] for e in status["nodes"]) == ["node-a", "node-b"]  # not node-c
    assert {e["phase"] for e in status["nodes"]} == {"Ready"}
    assert FINALIZER in obj["metadata"]["finalizers"]
    assert _condition(obj, "Resolved")["status"] == "True"
    assert status["observedGeneration"] == obj["metadata"]["generation"]

    holder = f"model:{NAMESPACE}/llama@{status['resolved']['version']}"
    for name in ("node-a", "node-b"):
        assert _pins(cluster["nodes"][name]) == {holder: 3}
        client_ = NodeClient(cluster["nodes"][name].unix_endpoint, token="", tls_ca="")
        for key, data in files.items():
            info = client_.stat(s3.url(key))
            assert client_.read(info, 0, info.size) == data
    assert _pins(cluster["nodes"]["node-c"]) == {}
    for key in files:  # the two nodes shared blocks: each block from the origin once
        gets = s3.gets(key)
        assert len(gets) == len(set(gets)), key


def test_a_bad_source_is_a_condition_a_person_can_act_on(cluster, s3) -> None:
    cluster["objects"].create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, _model("missing", s3.url("no/such/prefix/"))
    )

    def resolved_false() -> dict[str, Any] | None:
        condition = _condition(_get(cluster, "missing"), "Resolved")
        return condition if condition.get("status") == "False" else None

    condition = wait_for(resolved_false, timeout=60, message="Resolved=False")
    assert condition["reason"] == "ResolveFailed"
    assert "no/such/prefix" in condition["message"]
    assert _condition(_get(cluster, "missing"), "Ready")["status"] == "False"


def test_a_new_version_rolls_out_while_a_mounted_volume_keeps_the_old(cluster, s3) -> None:
    old = os.urandom(2 * BLOCK)
    s3.put("bert/model.bin", old)
    cluster["objects"].create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, _model("bert", s3.url("bert/"), updatePolicy="Latest")
    )
    first = _ready(cluster, "bert")["status"]["resolved"]["version"]
    node = cluster["nodes"]["node-a"]
    volume = NodeClient(node.unix_endpoint, token="", tls_ca="")
    view = volume.view("csi:vol-1", [s3.url("bert/")])  # a volume mounted on the old one
    assert Path(view.path, "model.bin").read_bytes() == old

    new = os.urandom(2 * BLOCK)
    s3.put("bert/model.bin", new)
    obj = _ready(cluster, "bert", version=first)
    status = obj["status"]
    assert status["resolved"]["version"] != first
    assert status["previous"]["version"] == first
    assert Path(view.path, "model.bin").read_bytes() == old  # the volume keeps its files
    pins = _pins(node)
    assert pins.get(f"model:{NAMESPACE}/bert@{first}") is None  # released by the model
    assert pins[f"model:{NAMESPACE}/bert@{status['resolved']['version']}"] == 1
    assert pins["csi:vol-1"] == 1  # the old object stays pinned by its volume


def test_deleting_a_model_releases_its_pins_everywhere_then_it_goes(cluster, s3) -> None:
    s3.put("gone/a.bin", os.urandom(BLOCK))
    cluster["objects"].create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, _model("gone", s3.url("gone/"))
    )
    _ready(cluster, "gone")
    cluster["objects"].delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "gone")
    wait_for(lambda: _get(cluster, "gone") is None, timeout=60, message="the model to go")
    for node in cluster["nodes"].values():
        assert not [h for h in _pins(node) if h.startswith("model:")]
    # The bytes stay cached until eviction needs the room.
    listed = NodeClient(cluster["nodes"]["node-a"].unix_endpoint, token="", tls_ca="").cached()
    assert [e.url for e in listed] == [s3.url("gone/a.bin")]


def test_a_node_that_leaves_drops_out_of_the_status(cluster, s3) -> None:
    s3.put("opt/model.bin", os.urandom(2 * BLOCK))
    cluster["objects"].create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, _model("opt", s3.url("opt/"))
    )
    assert _ready(cluster, "opt")["status"]["ready"] == "2/2"
    leader = _leader(cluster)
    crashed, stopping = sorted(("node-a", "node-b"), key=lambda name: name == leader)

    # A crash says nothing: its heartbeat stops, and the leader removes its entry.
    cluster["nodes"][crashed].kill()

    def without_crashed() -> dict[str, Any] | None:
        obj = _get(cluster, "opt")
        status = (obj or {}).get("status") or {}
        if crashed in _entries(obj) or status.get("ready") != "1/1":
            return None
        return obj

    obj = wait_for(without_crashed, timeout=60, message=f"{crashed}'s entry to go")
    assert list(_entries(obj)) == [stopping]
    assert (obj["status"]["readyNodes"], obj["status"]["desiredNodes"]) == (1, 1)
    assert _condition(obj, "Ready")["status"] == "True"

    # A clean stop removes its own entries on the way out (and hands the lease on).
    cluster["nodes"][stopping].signal(signal.SIGTERM)
    assert cluster["nodes"][stopping].wait_exit() == 0
    assert _entries(_get(cluster, "opt")) == {}

    def no_nodes() -> dict[str, Any] | None:
        obj = _get(cluster, "opt")
        ready = _condition(obj, "Ready")
        return obj if ready.get("reason") == "NoNodes" else None

    obj = wait_for(no_nodes, timeout=60, message="the aggregate to count no node")
    assert (obj["status"]["readyNodes"], obj["status"]["desiredNodes"]) == (0, 0)
    assert _condition(obj, "Ready")["status"] == "False"
    assert _leader(cluster) == "node-c"


@pytest.mark.parametrize("cluster", [("node-c",)], ids=["node-c-later"], indirect=True)
def test_a_node_that_joins_fills_from_its_peers_and_is_labelled(cluster, s3) -> None:
    files = {f"mistral/shard-{i}.bin": os.urandom(4 * BLOCK + i) for i in range(2)}
    for key, data in files.items():
        s3.put(key, data)
    source = s3.url("mistral/")
    cluster["objects"].create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, _model("mistral", source)
    )
    version = _ready(cluster, "mistral")["status"]["resolved"]["version"]
    gets = {key: len(s3.gets(key)) for key in files}
    key = label_key(source)
    labelled = wait_for(
        lambda: (
            {n for n, labels in cluster["api"].nodes.items() if labels.get(key) == "ready"}
            == {"node-a", "node-b"}
        ),
        timeout=30,
        message=f"the label {key} on the two nodes",
    )
    assert labelled

    cluster["api"].nodes["node-c"]["pool"] = "gpu"  # a new GPU node
    joined = cluster["start"]("node-c")

    def three_ready() -> dict[str, Any] | None:
        obj = _get(cluster, "mistral")
        ready = obj and obj["status"].get("ready") == "3/3"
        return obj if ready and _condition(obj, "Ready")["status"] == "True" else None

    obj = wait_for(three_ready, timeout=60, message="the new node to be ready")
    assert _entries(obj)["node-c"]["phase"] == "Ready"
    assert _entries(obj)["node-c"]["version"] == version
    assert _pins(joined) == {f"model:{NAMESPACE}/mistral@{version}": 2}
    # Every block came from the two nodes that had it: the origin served no GET.
    assert {key: len(s3.gets(key)) for key in files} == gets
    assert NodeClient(joined.unix_endpoint, token="", tls_ca="").status().fetched_bytes == 0
    wait_for(
        lambda: cluster["api"].nodes["node-c"].get(key) == "ready",
        timeout=30,
        message=f"node-c's label {key}",
    )
