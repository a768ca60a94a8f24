"""Least privilege, against real daemons: each caller gets what the policy allows.

A node with a policy is called by a pod-like client (a projected ServiceAccount
token, checked by a Kubernetes API stand-in's TokenReview), by a local process of
another uid (its uid from the socket), through the CSI plugin and the CLI; callers
state manifests and block sizes the node must not trust.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from daemon import TOKEN
from k8s_api import KubeApiServer
from servers import NOBODY_GID, NobodyRunner

from cachefs.client import NodeClient
from cachefs.errors import VersionChangedError
from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import cachefs_pb2_grpc as pb_grpc

BLOCK = 64 * 1024


@pytest.fixture
def api() -> Any:
    with KubeApiServer("cachefs") as server:
        yield server


def _node(start_node, tmp_path: Path, s3, api, **extra: Any) -> Any:
    """A node whose policy: uid 0 (the test) and the cluster token may do everything;
    team-a's pods read and prefetch its own prefix; every pod views the shared models;
    uid 65534 reads the public prefix."""
    cache = tmp_path / "cache"
    config = {
        "cache_dir": str(cache),
        "block_size": BLOCK,
        "cluster": {"kubernetes_api_url": api.url},
        "server": {"socket_group": str(NOBODY_GID)},
        "policy": [
            {"callers": ["uid:0", "cluster"], "allow": ["all"]},
            {
                "callers": ["namespace:team-a"],
                "allow": ["read", "prefetch"],
                "sources": [s3.url("team-a/")],
            },
            {"callers": ["pod"], "allow": ["view", "read"], "sources": [s3.url("shared/")]},
            {"callers": ["uid:65534"], "allow": ["read"], "sources": [s3.url("public/")]},
        ],
        **extra,
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_node(cache, config=path)


def _pod_client(node: Any, api: KubeApiServer, tmp_path: Path, namespace: str) -> NodeClient:
    token_file = tmp_path / f"token-{namespace}"
    token_file.write_text(api.issue_token(namespace, "loader") + "\n")
    return NodeClient(node.unix_endpoint, token="", tls_ca="", pod_token_file=str(token_file))


def test_a_pod_gets_what_its_namespace_may(start_node, tmp_path, s3, api) -> None:
    for key in ("team-a/a.bin", "team-b/b.bin", "shared/s.bin"):
        s3.put(key, os.urandom(BLOCK + 7))
    node = _node(start_node, tmp_path, s3, api)
    team_a = _pod_client(node, api, tmp_path, "team-a")

    done = team_a.prefetch([s3.url("team-a/")], pin="job:a")
    assert done.state == "succeeded" and done.pin_holder == "serviceaccount:team-a/loader/job:a"
    assert team_a.stat(s3.url("shared/s.bin")).size == BLOCK + 7  # every pod reads shared/
    with pytest.raises(PermissionError) as refused:
        team_a.prefetch([s3.url("team-b/")])
    message = str(refused.value)
    assert "pod service account team-a/loader may not prefetch" in message
    assert s3.url("team-b/") in message and "callers: [serviceaccount:team-a/loader]" in message
    for action in (
        lambda: team_a.stat(s3.url("team-b/b.bin")),
        lambda: team_a.cached(s3.url("team-b/")),
        lambda: team_a.evict([s3.url("team-a/")]),  # evicting is managing
        lambda: team_a.prefetch([s3.url("team-a/")], cluster=True),
    ):
        with pytest.raises(PermissionError):
            action()
    assert s3.gets("team-b/b.bin") == []  # nothing was fetched for a refused call

    # Its pins are its own: it cannot release the operator's, and sees only its own.
    operator = NodeClient(node.unix_endpoint, token="", tls_ca="", pod_token_file="")
    operator.prefetch([s3.url("team-b/")], pin="csi:vol-9")
    assert team_a.unpin("csi:vol-9") == 0  # its own holder of that name: none
    assert operator.status().pins == {"csi:vol-9": 1, "serviceaccount:team-a/loader/job:a": 1}
    assert team_a.status().pins == {"serviceaccount:team-a/loader/job:a": 1}
    assert [e.url for e in team_a.cached()] == [s3.url("team-a/a.bin")]
    assert [j.sources for j in team_a.status().jobs] == [(s3.url("team-a/"),)]
    assert team_a.unpin("job:a") == 1


def test_pod_tokens_are_checked_with_the_api(start_node, tmp_path, s3, api) -> None:
    s3.put("shared/s.bin", b"x" * 10)
    node = _node(start_node, tmp_path, s3, api)
    wrong_audience = tmp_path / "aud"
    wrong_audience.write_text(api.issue_token("team-a", "loader", audiences=("vault",)))
    forged = tmp_path / "forged"
    forged.write_text("sa-team-a-loader-0-" + "y" * 32)
    for token_file in (wrong_audience, forged):
        client = NodeClient(node.unix_endpoint, token="", tls_ca="", pod_token_file=str(token_file))
        with pytest.raises(PermissionError, match="pod token was not accepted") as refused:
            client.stat(s3.url("shared/s.bin"))
        assert token_file.read_text() not in str(refused.value)
    # Over TCP too: a pod token stands in for the cluster token there.
    token_file = tmp_path / "good"
    token_file.write_text(api.issue_token("team-c", "x"))
    tcp = NodeClient(node.tcp_endpoint, token="", tls_ca="", pod_token_file=str(token_file))
    reviews = api.reviews
    assert tcp.stat(s3.url("shared/s.bin")).size == 10
    assert tcp.stat(s3.url("shared/s.bin")).size == 10
    assert api.reviews == reviews + 1  # the answer is kept for a while
    with pytest.raises(PermissionError, match="no token was presented"):
        NodeClient(node.tcp_endpoint, token="", tls_ca="", pod_token_file="").stat(
            s3.url("shared/s.bin")
        )


def test_a_local_process_is_known_by_its_uid(
    start_node, tmp_path, s3, api, run_as_nobody: NobodyRunner
) -> None:
    s3.put("public/p.bin", b"p" * 100)
    s3.put("private/q.bin", b"q" * 100)
    node = _node(start_node, tmp_path, s3, api)
    probe = (
        "import os, sys\n"
        "from cachefs.client import NodeClient\n"
        "client = NodeClient(os.environ['PROBE_ENDPOINT'], token='', tls_ca='', "
        "pod_token_file='')\n"
        "for url in sys.argv[1:]:\n"
        "    try:\n"
        "        print('ok', client.stat(url).size)\n"
        "    except PermissionError as exc:\n"
        "        print('refused', exc.strerror)\n"
    )
    result = run_as_nobody(
        [*run_as_nobody.python, "-c", probe, s3.url("public/p.bin"), s3.url("private/q.bin")],
        env={"PROBE_ENDPOINT": node.unix_endpoint},
    )
    public, private = result.stdout.splitlines()
    assert public == "ok 100", result.stdout + result.stderr
    assert private.startswith("refused local process uid 65534 gid 65534"), private
    assert "may not read" in private and "callers: [uid:65534]" in private


def test_only_the_socket_reaches_the_listener_behind_it(start_node, tmp_path, s3, api) -> None:
    s3.put("public/p.bin", b"p")
    node = _node(start_node, tmp_path, s3, api)
    relay = node.serving["socket_relay"]
    channel = grpc.insecure_channel(relay)
    stub = pb_grpc.CacheStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)  # even with the cluster token
    with pytest.raises(grpc.RpcError) as refused:
        stub.Stat(pb.StatRequest(url=s3.url("public/p.bin")), timeout=10, metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unix socket" in refused.value.details()
    channel.close()


@pytest.mark.exercises("CACHEFS_POD_TOKEN_FILE", "CACHEFS_ENDPOINT")
def test_the_cli_as_a_pod_is_refused_with_the_rule_to_add(start_node, tmp_path, s3, api) -> None:
    s3.put("team-b/b.bin", b"b")
    node = _node(start_node, tmp_path, s3, api)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env["CACHEFS_ENDPOINT"] = node.unix_endpoint
    env["CACHEFS_POD_TOKEN_FILE"] = str(_token(tmp_path, api))
    result = subprocess.run(
        [sys.executable, "-m", "cachefs.cli", "prefetch", s3.url("team-b/b.bin")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("cachefs: error: pod service account team-a/loader may not prefetch")
    assert "allow: [prefetch]" in line


# -- what callers state -------------------------------------------------------------


def _prefetch_manifest(node: Any, objects: list[pb.ObjectInfo], token: str | None = TOKEN) -> Any:
    client = NodeClient(node.unix_endpoint, token=token or "", tls_ca="", pod_token_file="")
    sources = [o.url for o in objects]
    return client.wait(client.start_job(pb.PrefetchRequest(sources=sources, objects=objects)).id)


def test_a_stated_manifest_is_checked_never_trusted(start_node, tmp_path, s3, api) -> None:
    data = os.urandom(2 * BLOCK)
    s3.put("m/x.bin", data)
    node = _node(start_node, tmp_path, s3, api)
    operator = NodeClient(node.unix_endpoint, token="", tls_ca="", pod_token_file="")
    real = operator.stat(s3.url("m/x.bin"))
    etag = real.version.removeprefix("etag:")
    url = s3.url("m/x.bin")

    def entry(**fields: Any) -> pb.ObjectInfo:
        values = {"url": url, "version": real.version, "size": real.size, "etag": etag}
        return pb.ObjectInfo(**{**values, **fields})

    with pytest.raises(ValueError, match="needs an ETag"):
        _prefetch_manifest(node, [entry(etag="")])  # an unconditional GET: never
    with pytest.raises(ValueError, match="needs an ETag"):
        _prefetch_manifest(node, [entry(version="etag:forged")])
    with pytest.raises(PermissionError, match="may not peer"):  # only peers state manifests
        NodeClient(
            node.unix_endpoint, token="", tls_ca="", pod_token_file=str(_token(tmp_path, api))
        ).start_job(pb.PrefetchRequest(sources=[url], objects=[entry()]))
    for size in (3 * BLOCK, BLOCK + 5):  # a wrong size: the node's own stat disagrees
        with pytest.raises(VersionChangedError, match=f"the manifest says {size}"):
            _prefetch_manifest(node, [entry(size=size)])
    s3.put("m/x.bin", os.urandom(2 * BLOCK))  # a new version at the origin
    with pytest.raises(VersionChangedError):  # the old ETag: If-Match refuses
        _prefetch_manifest(node, [entry()])
    # Nothing was stored under any stated version (a refused fill leaves no bytes).
    assert all(entry.cached_bytes == 0 for entry in operator.cached())


def _token(tmp_path: Path, api: KubeApiServer) -> Path:
    path = tmp_path / "pod-token"
    path.write_text(api.issue_token("team-a", "loader"))
    return path
