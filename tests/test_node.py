"""The node daemon and its clients: a real ``cachefs node`` process per test.

Reads through gRPC equal the origin's, the fast path sends no bytes through gRPC,
TCP needs the token, oversized requests are refused, a killed node is a clear error
and a restarted one serves from its cache, one origin GET per block however many
processes read, SIGTERM drains, and forked clients keep working.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import grpc
import pytest
from daemon import TOKEN
from helpers import Background
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.errors import NodeUnavailableError
from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import cachefs_pb2_grpc as pb_grpc

MiB = 1024 * 1024
BLOCK = 256 * 1024


def _payload(size: int, seed: int = 7) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size] if seed == 0 else os.urandom(size)


def _config(tmp_path: Path, cache_dir: Path, **server: object) -> Path:
    import yaml

    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump({"cache_dir": str(cache_dir), "block_size": BLOCK, "server": server or {}})
    )
    return path


def _fs(endpoint: str, **options: object) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("cachefs", endpoint=endpoint, skip_instance_cache=True, **options)


def _rpcs(node_endpoint: str) -> dict[str, int]:
    return NodeClient(node_endpoint).status().rpcs


@pytest.fixture
def node(start_node, tmp_path, s3):
    cache = tmp_path / "cache"
    return start_node(cache, config=_config(tmp_path, cache))


@pytest.mark.exercises("--socket", "--address", "CACHEFS_TOKEN")
def test_reads_through_grpc_equal_the_origin(node, s3, monkeypatch) -> None:
    data = _payload(3 * BLOCK + 1234)
    s3.put("model.bin", data)
    for endpoint in (node.unix_endpoint, node.tcp_endpoint):
        monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
        fs = _fs(endpoint, local_reads=False)
        assert fs.cat_file(s3.url("model.bin")) == data
        assert (
            fs.cat_file(s3.url("model.bin"), start=BLOCK - 5, end=2 * BLOCK + 7)
            == data[BLOCK - 5 : 2 * BLOCK + 7]
        )
        with fs.open(s3.url("model.bin"), block_size=100_000) as f:
            f.seek(1000)
            assert f.read(500_000) == data[1000:501_000]
        assert fs.info(s3.url("model.bin"))["size"] == len(data)
    # The chained form, with the endpoint from the environment.
    monkeypatch.setenv("CACHEFS_ENDPOINT", node.unix_endpoint)
    with fsspec.open(f"cachefs::{s3.url('model.bin')}", "rb") as f:
        assert f.read() == data
    assert s3.gets("model.bin") and all(r is not None for r in s3.gets("model.bin"))
    assert len(s3.gets("model.bin")) == 4  # each block once, whoever asked


def test_errors_cross_the_wire_as_the_same_exceptions(node, s3) -> None:
    fs = _fs(node.unix_endpoint)
    with pytest.raises(FileNotFoundError, match="no-such-key"):
        fs.cat_file(s3.url("no-such-key"))
    with pytest.raises(ValueError, match=r"scheme|protocol|URL"):
        fs.cat_file("nosuchscheme://x/y")
    s3.put("dir/a.bin", b"a")
    assert fs.info(s3.url("dir"))["type"] == "directory"
    names = fs.ls(s3.url("dir/"), detail=False)
    assert any(name.endswith("dir/a.bin") for name in names)


def test_fast_path_reads_the_file_without_a_read_rpc(node, s3) -> None:
    data = _payload(2 * BLOCK + 99)
    s3.put("weights.bin", data)
    client = NodeClient(node.unix_endpoint)
    client.prefetch([s3.url("weights.bin")])
    before = _rpcs(node.unix_endpoint).get("Read", 0)

    fs = _fs(node.unix_endpoint)
    assert fs.cat_file(s3.url("weights.bin")) == data
    assert fs.cat_file(s3.url("weights.bin"), start=10, end=20) == data[10:20]
    with fs.open(s3.url("weights.bin")) as f:
        assert f.read() == data
    path = fs.open_local(s3.url("weights.bin"))
    assert Path(path).read_bytes() == data
    assert _rpcs(node.unix_endpoint).get("Read", 0) == before  # no byte crossed gRPC

    # A file this host cannot see (another host's path) is read through gRPC instead.
    info = client.stat(s3.url("weights.bin"))
    elsewhere = type(info)(**{**vars(info), "local_path": "/nonexistent/data"})
    assert client.local_path(elsewhere) is None
    assert client.read(elsewhere, 0, len(data)) == data
    assert _rpcs(node.unix_endpoint).get("Read", 0) == before + 1


def _raw_stub(target: str, **options: int) -> pb_grpc.CacheStub:
    channel = grpc.insecure_channel(target, options=list(options.items()))
    return pb_grpc.CacheStub(channel)


def test_tcp_needs_the_token_and_health_does_not(node, s3, monkeypatch) -> None:
    s3.put("k.bin", b"x" * 10)
    stub = _raw_stub(node.tcp_endpoint)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Stat(pb.StatRequest(url=s3.url("k.bin")), metadata=metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in (caught.value.details() or "")
    ok = stub.Stat(
        pb.StatRequest(url=s3.url("k.bin")),
        metadata=(("authorization", f"Bearer {TOKEN}"),),
        timeout=10,
    )
    assert ok.size == 10
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(node.tcp_endpoint))
    answer = health.Check(health_pb2.HealthCheckRequest(service="cachefs.v1.Cache"), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    # Through the client: a clear error that names the fix, never the token.
    monkeypatch.setenv("CACHEFS_TOKEN", "not-the-token")
    with pytest.raises(PermissionError, match="CACHEFS_TOKEN") as refused:
        _fs(node.tcp_endpoint).info(s3.url("k.bin"))
    assert "not-the-token" not in str(refused.value)
    monkeypatch.delenv("CACHEFS_TOKEN")
    with pytest.raises(PermissionError, match="no token"):
        _fs(node.tcp_endpoint).info(s3.url("k.bin"))
    assert all(TOKEN not in line for line in node.lines)


def test_oversized_request_is_resource_exhausted(node) -> None:
    stub = _raw_stub(node.unix_endpoint, **{"grpc.max_send_message_length": 64 * MiB})
    huge = pb.PrefetchRequest(sources=["s3://bucket/" + "k" * 1000] * 5000)  # ~5 MB
    with pytest.raises(grpc.RpcError) as caught:
        stub.Prefetch(huge, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The node is fine afterwards.
    assert NodeClient(node.unix_endpoint).status().tiers


def test_chunk_size_out_of_range_is_invalid_argument(node, s3) -> None:
    s3.put("c.bin", b"c" * 100)
    stub = _raw_stub(node.unix_endpoint)
    request = pb.ReadRequest(url=s3.url("c.bin"), chunk_size=64 * MiB)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Read(request, timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.trailing_metadata())["cachefs-error"] == "ValueError"


def test_killed_node_is_a_clear_error_and_a_restart_serves_the_cache(
    start_node, tmp_path, s3, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    config = _config(tmp_path, cache)
    node = start_node(cache, config=config, socket_path=tmp_path / "n.sock")
    data = _payload(4 * BLOCK)
    s3.put("big.bin", data)
    monkeypatch.setenv("CACHEFS_RECONNECT_GRACE", "0")  # no wait for it (test_restarts.py)
    fs = _fs(node.unix_endpoint, local_reads=False, timeout=20)
    assert fs.cat_file(s3.url("big.bin"), start=0, end=2 * BLOCK) == data[: 2 * BLOCK]
    s3.reset_requests()

    with s3.hold_gets("big.bin") as gate:
        reader = Background(lambda: fs.cat_file(s3.url("big.bin")))
        gate.wait_held()
        started = time.monotonic()
        node.kill()
        error = reader.outcome(timeout=20)
    assert isinstance(error, NodeUnavailableError), error
    assert "cachefs node" in str(error) and time.monotonic() - started < 20

    restarted = start_node(cache, config=config, socket_path=tmp_path / "n.sock")
    s3.reset_requests()
    assert (
        _fs(restarted.unix_endpoint, local_reads=False).cat_file(
            s3.url("big.bin"), start=0, end=2 * BLOCK
        )
        == data[: 2 * BLOCK]
    )
    assert s3.gets("big.bin") == []  # the first two blocks came from the cache
    assert _fs(restarted.unix_endpoint).cat_file(s3.url("big.bin")) == data


def test_sixteen_client_processes_one_get_per_block(node, s3, tmp_path) -> None:
    data = _payload(6 * BLOCK + 7)
    s3.put("cold.bin", data)
    script = tmp_path / "reader.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, xxhash, fsspec
            fs = fsspec.filesystem("cachefs", endpoint=sys.argv[1], local_reads=False)
            print(xxhash.xxh3_128_hexdigest(fs.cat_file(sys.argv[2])))
            """
        )
    )
    import xxhash

    with s3.hold_gets("cold.bin") as gate:
        readers = [
            subprocess.Popen(
                [sys.executable, str(script), node.unix_endpoint, s3.url("cold.bin")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(16)
        ]
        # Every reader is in (its Stat done, its Read waiting) before any block arrives.
        wait_for(lambda: _rpcs(node.unix_endpoint).get("Stat", 0) >= 16, timeout=60)
        gate.wait_held()
    outputs = [r.communicate(timeout=120) for r in readers]
    for reader, (out, err) in zip(readers, outputs, strict=True):
        assert reader.returncode == 0, err
        assert out.strip() == xxhash.xxh3_128_hexdigest(data)
    gets = s3.gets("cold.bin")
    assert len(gets) == 7 and len(set(gets)) == 7  # one GET per block


def test_sigterm_drains_reads_in_flight_and_refuses_new_ones(node, s3) -> None:
    data = _payload(2 * BLOCK)
    s3.put("slow.bin", data)
    s3.put("other.bin", b"o" * 10)
    fs = _fs(node.unix_endpoint, local_reads=False, timeout=30)
    with s3.hold_gets("slow.bin") as gate:
        reader = Background(lambda: fs.cat_file(s3.url("slow.bin")))
        gate.wait_held()
        node.signal(signal.SIGTERM)
        wait_for(
            lambda: any("draining" in line for line in node.lines), message="the node to drain"
        )
        with pytest.raises((NodeUnavailableError, OSError)):
            NodeClient(node.unix_endpoint, timeout=5).stat(s3.url("other.bin"))
        assert node.process.poll() is None  # still serving the read in flight
    assert reader.join(timeout=30) == data
    assert node.wait_exit(timeout=30) == 0


FORK_SCRIPT = """
import os, sys, threading, xxhash, fsspec
endpoint, url, expected = sys.argv[1], sys.argv[2], sys.argv[3]
fs = fsspec.filesystem("cachefs", endpoint=endpoint, local_reads=False)
def digest():
    return xxhash.xxh3_128_hexdigest(fs.cat_file(url))
assert digest() == expected  # the parent has a channel before it forks
codes = []
for _round in range(5):  # a broken fork shows only sometimes: try several
    results = []
    streams = [threading.Thread(target=lambda: results.append(digest())) for _ in range(3)]
    for t in streams:
        t.start()
    pid = os.fork()  # while the threads' streams are in flight, as DataLoader workers do
    if pid == 0:
        ok = digest() == expected and digest() == expected
        os._exit(0 if ok else 3)
    for t in streams:
        t.join()
    _, status = os.waitpid(pid, 0)
    assert results == [expected] * 3, results
    codes.append(os.waitstatus_to_exitcode(status))
assert digest() == expected
print("children", *codes)
"""


def test_fork_with_calls_in_flight_keeps_parent_and_child_working(node, s3, tmp_path) -> None:
    import xxhash

    data = _payload(8 * BLOCK)
    s3.put("forked.bin", data)
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            node.unix_endpoint,
            s3.url("forked.bin"),
            xxhash.xxh3_128_hexdigest(data),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "children 0 0 0 0 0"


@pytest.mark.exercises("--detach", "--pin", "--holder", "--json", "CACHEFS_ENDPOINT")
def test_cli_prefetch_waits_detaches_and_status_shows_the_job(node, s3, tmp_path) -> None:
    data = _payload(3 * BLOCK)
    s3.put("m/a.bin", data)
    s3.put("m/b.bin", data[:1000])
    env = {**os.environ, "CACHEFS_ENDPOINT": node.unix_endpoint}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cachefs.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    waited = cli("prefetch", "--json", "--pin", "--holder", "job:one", s3.url("m/"))
    assert waited.returncode == 0, waited.stderr
    lines = [__import__("json").loads(line) for line in waited.stdout.splitlines()]
    assert lines[-1]["event"] == "done" and lines[-1]["bytes"] == len(data) + 1000
    assert lines[-1]["pinned_by"] == "job:one"
    assert any(line["event"] == "progress" for line in lines)

    s3.put("m/c.bin", data[:5000])
    detached = cli("prefetch", "--detach", s3.url("m/c.bin"))
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    client = NodeClient(node.unix_endpoint)
    final = client.wait(job_id)
    assert final.state == "succeeded" and final.bytes_done == 5000

    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert "pin job:one: 2 objects" in status.stdout and job_id in status.stdout
    listing = cli("ls", "--json", s3.url("m/"))
    assert len(listing.stdout.splitlines()) == 3
    missing = cli("prefetch", s3.url("m/nope.bin"))
    assert missing.returncode == 1 and "nope.bin" in missing.stderr
    refused = cli("evict", s3.url("m/a.bin"))
    assert refused.returncode == 1 and "pinned" in refused.stderr
    assert cli("unpin", "--holder", "job:one").returncode == 0
    assert cli("evict", s3.url("m/")).returncode == 0
    assert client.cached() == []


def test_pins_survive_a_node_restart(start_node, tmp_path, s3) -> None:
    cache = tmp_path / "cache"
    config = _config(tmp_path, cache)
    node = start_node(cache, config=config, socket_path=tmp_path / "p.sock")
    s3.put("pinned.bin", b"p" * 1000)
    NodeClient(node.unix_endpoint).prefetch([s3.url("pinned.bin")], pin="csi:vol-1")
    node.kill()
    again = start_node(cache, config=config, socket_path=tmp_path / "p.sock")
    assert NodeClient(again.unix_endpoint).status().pins == {"csi:vol-1": 1}


def test_socket_mode_and_unreachable_endpoint(node, tmp_path) -> None:
    mode = node.socket_path.stat().st_mode & 0o777
    assert mode == 0o660
    with pytest.raises(NodeUnavailableError, match="cachefs node"):
        NodeClient(f"unix://{tmp_path}/nobody-here.sock", timeout=5).status()
    with pytest.raises(ValueError, match="host:port"):
        _fs("not an endpoint").info("s3://b/k")


def test_sigterm_ends_the_watch_of_a_running_job_with_a_clear_error(node, s3) -> None:
    s3.put("job.bin", _payload(2 * BLOCK))
    client = NodeClient(node.unix_endpoint)
    with s3.hold_gets("job.bin") as gate:
        watcher = Background(lambda: client.prefetch([s3.url("job.bin")]))
        gate.wait_held()
        node.signal(signal.SIGTERM)
        error = watcher.outcome(timeout=20)
    assert isinstance(error, NodeUnavailableError), error
    assert "shutting down" in str(error)
    assert node.wait_exit(timeout=30) == 0


def test_a_listing_larger_than_one_message_arrives_whole(start_node, tmp_path, http_origin) -> None:
    """List streams its entries in batches: 2 500 names (three batches) all arrive."""
    from cachefs.node.server import LIST_BATCH

    count = 2 * LIST_BATCH + 500
    for i in range(count):
        http_origin.put(f"/many/f{i:05d}.bin", b"x")
    node = start_node(tmp_path / "cache")
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    names = [e["name"] for e in client.ls(http_origin.url("/many/"))]
    assert names == [http_origin.url(f"/many/f{i:05d}.bin") for i in range(count)]
    client.close()
