"""What a running node tells its operators: Prometheus metrics, JSON logs with request
ids, the Status call and the gRPC health service, from real ``cachefs node`` processes
reading a real S3 origin.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import fsspec
import grpc
import pytest
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import cachefs_pb2_grpc as pb_grpc

BLOCK = 256 * 1024

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _config(
    tmp_path: Path, cache_dir: Path | None, server: dict[str, Any] | None = None, **top: Any
) -> Path:
    """A node config with 256 KiB blocks; ``top`` adds (or, with tiers, replaces) keys."""
    import yaml

    path = tmp_path / "node.yaml"
    settings: dict[str, Any] = {"block_size": BLOCK, "server": server or {}, **top}
    if cache_dir is not None:
        settings["cache_dir"] = str(cache_dir)
    path.write_text(yaml.safe_dump(settings))
    return path


def _fs(endpoint: str, **options: Any) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("cachefs", endpoint=endpoint, skip_instance_cache=True, **options)


def _scrape(url: str) -> tuple[str, Samples]:
    """The metrics page and its samples, keyed by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the node has not reported it."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def node(start_node, tmp_path, s3):
    cache = tmp_path / "cache"
    return start_node(cache, config=_config(tmp_path, cache))


# -- metrics ---------------------------------------------------------------------------


@pytest.mark.exercises("--metrics-address")
def test_metrics_follow_cold_and_warm_reads(node, s3) -> None:
    data = os.urandom(3 * BLOCK + 100)  # under one 1 MiB chunk: each read is one Read call
    s3.put("metrics/model.bin", data)
    url = s3.url("metrics/model.bin")
    fs = _fs(node.unix_endpoint, local_reads=False)

    assert fs.cat_file(url) == data
    _, cold = _scrape(node.metrics_url)
    assert _value(cold, "cachefs_served_bytes_total", source="origin") == len(data)
    assert _value(cold, "cachefs_origin_fetched_bytes_total") == len(data)
    assert _value(cold, "cachefs_misses_total") > 0

    assert fs.cat_file(url) == data
    text, warm = _scrape(node.metrics_url)
    local_before = _value(cold, "cachefs_served_bytes_total", source="local")
    assert _value(warm, "cachefs_served_bytes_total", source="local") == local_before + len(data)
    assert _value(warm, "cachefs_served_bytes_total", source="origin") == len(data)
    assert _value(warm, "cachefs_hits_total") > 0
    assert _value(warm, "cachefs_origin_fetched_bytes_total") == len(data)  # nothing refetched

    tier = {"tier": "disk", "medium": "disk"}
    used = _value(warm, "cachefs_tier_used_bytes", **tier)
    quota = _value(warm, "cachefs_tier_quota_bytes", **tier)
    assert len(data) <= used <= quota
    assert _value(warm, "cachefs_tier_objects", **tier) == 1
    for operation in ("read", "stat"):
        assert _value(warm, "cachefs_origin_request_seconds_count", operation=operation) > 0
        inf = _value(warm, "cachefs_origin_request_seconds_bucket", operation=operation, le="+Inf")
        assert inf == _value(warm, "cachefs_origin_request_seconds_count", operation=operation)
    assert _value(warm, "cachefs_rpcs_total", method="Read", code="OK") >= 2
    assert _value(warm, "cachefs_errors_total", kind="FileNotFoundError") == 0

    with pytest.raises(FileNotFoundError):
        fs.cat_file(s3.url("metrics/missing.bin"))
    text, after = _scrape(node.metrics_url)
    assert _value(after, "cachefs_errors_total", kind="FileNotFoundError") >= 1
    assert _value(after, "cachefs_rpcs_total", method="Stat", code="NOT_FOUND") == 1

    # Labels are fixed words: no URL, bucket or key ever becomes one.
    for _name, labels in after:
        for _label, value in labels:
            assert "://" not in value and s3.name not in value and "metrics/" not in value
    assert s3.name not in text and "missing.bin" not in text


def test_evictions_are_counted(start_node, tmp_path, s3) -> None:
    tier_root = tmp_path / "tier"
    quota = 3 * BLOCK  # one two-block object fits, two do not
    config = _config(
        tmp_path, None, tiers=[{"name": "disk", "path": str(tier_root), "quota": quota}]
    )
    node = start_node(tier_root, config=config)
    first, second = os.urandom(2 * BLOCK), os.urandom(2 * BLOCK)
    s3.put("evict/a.bin", first)
    s3.put("evict/b.bin", second)
    fs = _fs(node.unix_endpoint, local_reads=False)

    assert fs.cat_file(s3.url("evict/a.bin")) == first
    _, before = _scrape(node.metrics_url)
    assert _value(before, "cachefs_evictions_total", tier="disk") == 0
    assert _value(before, "cachefs_tier_quota_bytes", tier="disk", medium="disk") == quota

    assert fs.cat_file(s3.url("evict/b.bin")) == second
    _, after = _scrape(node.metrics_url)
    assert _value(after, "cachefs_evictions_total", tier="disk") >= 1
    assert _value(after, "cachefs_tier_used_bytes", tier="disk", medium="disk") <= quota
    assert _value(after, "cachefs_tier_objects", tier="disk", medium="disk") == 1
    assert NodeClient(node.unix_endpoint).status().tiers[0].evictions >= 1


# -- logs ------------------------------------------------------------------------------


def test_logs_are_json_and_carry_the_request_id(start_node, tmp_path, s3) -> None:
    cache = tmp_path / "cache"
    node = start_node(cache, config=_config(tmp_path, cache), extra_args=("-v",))
    s3.put("logs/present.bin", b"p" * 100)
    stub = pb_grpc.CacheStub(grpc.insecure_channel(node.unix_endpoint))

    with pytest.raises(grpc.RpcError) as caught:
        stub.Stat(
            pb.StatRequest(url=s3.url("logs/absent.bin")),
            metadata=(("x-request-id", "req-abc123"),),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    ok = stub.Stat(pb.StatRequest(url=s3.url("logs/present.bin")), timeout=10)
    assert ok.size == 100

    def tagged() -> list[dict[str, Any]]:
        return [r for r in node.records() if r.get("request_id") == "req-abc123"]

    wait_for(lambda: any(r.get("code") == "NOT_FOUND" for r in tagged()), timeout=10)
    failure = next(r for r in tagged() if r.get("code") == "NOT_FOUND")
    assert failure["method"] == "Stat"
    assert "absent.bin" in failure["msg"]

    # A call without an id gets one of its own (debug lines: one per call with -v).
    wait_for(
        lambda: any(r.get("method") == "Stat" and r.get("code") == "OK" for r in node.records()),
        timeout=10,
    )
    own = [r for r in node.records() if r.get("method") == "Stat" and r.get("code") == "OK"]
    assert own[0].get("request_id") and own[0]["request_id"] != "req-abc123"

    assert node.lines
    for line in list(node.lines):
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(record), line
        assert record["level"] in ("debug", "info", "warning", "error", "critical"), line


# -- status and health ------------------------------------------------------------------


@pytest.mark.exercises("--node-id")
def test_status_reports_the_node(start_node, tmp_path, s3) -> None:
    cache = tmp_path / "cache"
    node = start_node(cache, config=_config(tmp_path, cache), extra_args=("--node-id", "node-a"))
    prefetched, cold = os.urandom(BLOCK + 10), os.urandom(2 * BLOCK)
    s3.put("status/p.bin", prefetched)
    s3.put("status/c.bin", cold)
    client = NodeClient(node.unix_endpoint)

    job = client.prefetch([s3.url("status/p.bin")], pin="job:status")
    assert job.state == "succeeded"
    fs = _fs(node.unix_endpoint, local_reads=False)
    assert fs.cat_file(s3.url("status/c.bin")) == cold  # from the origin
    assert fs.cat_file(s3.url("status/p.bin")) == prefetched  # from the cache

    status = client.status().to_dict()  # the shape `cachefs status --json` prints
    assert status["node_id"] == "node-a"
    assert [t["name"] for t in status["tiers"]] == ["disk"]
    assert status["tiers"][0]["objects"] == 2
    assert status["tiers"][0]["used"] >= len(prefetched) + len(cold)
    jobs = {j["id"]: j for j in status["jobs"]}
    assert jobs[job.id]["state"] == "succeeded"
    assert jobs[job.id]["bytes_done"] == len(prefetched)
    assert jobs[job.id]["pin_holder"] == "job:status"
    assert status["pins"] == {"job:status": 1}
    assert 0 < status["hit_ratio"] < 1
    assert status["hit_ratio"] == pytest.approx(len(prefetched) / (len(prefetched) + len(cold)))
    assert status["rpcs"]["Prefetch"] == 1
    assert status["rpcs"]["Read"] >= 2 and status["rpcs"]["Stat"] >= 2


def test_health_serves_then_sigterm_exits_cleanly(node) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(node.unix_endpoint)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "cachefs.v1.Cache"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()

    node.signal(signal.SIGTERM)
    assert node.wait_exit(timeout=60) == 0
    messages = [r["msg"] for r in node.records()]
    assert any("draining" in m for m in messages) and "stopped" in messages
    assert not node.socket_path.exists()
