"""Node labels for data-aware scheduling, against a local server speaking the Node API."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from k8s_api import KubeApiServer
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.node.labels import label_key

BLOCK = 64 * 1024
NODE = "worker-1"


@pytest.fixture
def api():
    with KubeApiServer("cachefs-system") as server:
        server.nodes[NODE] = {"kubernetes.io/hostname": NODE}
        yield server


@pytest.fixture
def labelled_node(start_node, tmp_path, api):
    cache = tmp_path / "cache"
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cache_dir": str(cache),
                "block_size": BLOCK,
                "cluster": {"label_node": True, "kubernetes_api_url": api.url},
            }
        )
    )

    def start():
        return start_node(
            cache,
            config=config,
            tcp=False,
            metrics=False,
            env={"NODE_NAME": NODE},
            socket_path=tmp_path / "node.sock",
        )

    return start


def test_a_complete_source_labels_the_node_and_eviction_removes_it(labelled_node, api, s3):
    node = labelled_node()
    s3.put("llama/config.json", b"{}")
    s3.put("llama/model.safetensors", b"w" * (3 * BLOCK))
    source = s3.url("llama/")
    key = label_key(source)
    client = NodeClient(node.unix_endpoint)
    client.prefetch([source])
    wait_for(lambda: api.nodes[NODE].get(key) == "ready", timeout=10)
    assert api.nodes[NODE]["kubernetes.io/hostname"] == NODE  # other labels untouched

    client.evict([s3.url("llama/model.safetensors")])
    wait_for(lambda: key not in api.nodes[NODE], timeout=10)


def test_a_restarted_node_keeps_live_labels_and_drops_stale_ones(labelled_node, api, s3):
    node = labelled_node()
    s3.put("m/a.bin", b"a" * 1000)
    s3.put("n/b.bin", b"b" * 1000)
    live, gone = label_key(s3.url("m/")), label_key(s3.url("n/"))
    client = NodeClient(node.unix_endpoint)
    client.prefetch([s3.url("m/")])
    client.prefetch([s3.url("n/")])
    wait_for(lambda: api.nodes[NODE].get(live) == api.nodes[NODE].get(gone) == "ready")
    node.kill()
    # While the node was down, one object went away and someone left a stray label.
    cache_objects = list((node.cache_dir / "v1" / "objects").rglob("meta"))
    victim = next(p for p in cache_objects if b"n/b.bin" in p.read_bytes())
    (victim.parent / "data").unlink()
    victim.unlink()
    api.nodes[NODE]["cachefs.io/0123456789ab"] = "ready"

    labelled_node()
    wait_for(lambda: "cachefs.io/0123456789ab" not in api.nodes[NODE], timeout=10)
    wait_for(lambda: gone not in api.nodes[NODE], timeout=10)
    assert api.nodes[NODE].get(live) == "ready"


def test_labels_arrive_once_the_api_answers_again(labelled_node, api, s3):
    node = labelled_node()
    wait_for(lambda: api.patches or api.requests, timeout=10)  # the start-up reconcile
    api.refuse_patches = 2
    s3.put("x/model.bin", b"x" * 100)
    NodeClient(node.unix_endpoint).prefetch([s3.url("x/")])
    wait_for(lambda: api.nodes[NODE].get(label_key(s3.url("x/"))) == "ready", timeout=20)
    assert api.refuse_patches == 0  # both refusals were met and retried


def test_the_cli_prints_the_label_pods_ask_for() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachefs.cli", "label", "s3://models/llama-3-8b/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == label_key("s3://models/llama-3-8b/")
    assert result.stdout.startswith("cachefs.io/") and len(result.stdout.strip()) == 23
    assert label_key("s3://models/llama-3-8b/") != label_key("s3://models/llama-3-8b")
