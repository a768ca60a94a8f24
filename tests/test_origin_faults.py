"""Origins that misbehave: Retry-After and SlowDown, dripping bodies, a dead origin
(circuit breaker), the node's limit on origin requests, and deleted objects.

Every origin is a real server (moto for S3, the threaded range server for HTTP, the
local filesystem for a generic fsspec origin); cachefs runs as its CLI or a node.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import run_cli
from servers import wait_for

from cachefs.client import NodeClient
from cachefs.node.origins.errors import retry_after

BLOCK = 64 * 1024
RETRY_LINE = re.compile(r"retry (\d+) of (\d+) in ([0-9.]+)s")


def _config(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "cachefs.yaml"
    config = {"cache_dir": str(tmp_path / "cache"), "block_size": BLOCK, **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(config), *args, env=env)


def _cli_at(node: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a client of ``node``."""
    return run_cli("--endpoint", node.unix_endpoint, *args)


def _delays(stderr: str) -> list[float]:
    return [float(m.group(3)) for m in RETRY_LINE.finditer(stderr)]


# -- Retry-After and SlowDown ---------------------------------------------------------


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert retry_after({"retry-after": "7"}) == 7.0
    later = retry_after({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert later is not None and 25 <= later <= 30
    assert retry_after({"retry-after": formatdate(time.time() - 30, usegmt=True)}) == 0.0
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


def test_a_retry_after_in_seconds_is_waited_for(tmp_path, http_origin) -> None:
    http_origin.put("/m/a.bin", os.urandom(2 * BLOCK))
    http_origin.fail_next(1, 503, "/m/a.bin", headers={"Retry-After": "2"})
    config = _config(tmp_path, allow_redirects_to=["127.0.0.1/32"])
    result = _cli(config, "-v", "prefetch", http_origin.url("/m/a.bin"))
    assert result.returncode == 0, result.stderr
    assert "origin answered HTTP 503 and asked to retry after 2s" in result.stderr
    assert _delays(result.stderr) == [2.0]  # the origin's wait, not the 0.1 s back-off


def test_a_retry_after_date_is_waited_for(tmp_path, http_origin) -> None:
    http_origin.put("/m/a.bin", os.urandom(BLOCK))
    when = formatdate(time.time() + 3, usegmt=True)
    http_origin.fail_next(1, 429, "/m/a.bin", headers={"Retry-After": when})
    result = _cli(_config(tmp_path), "-v", "prefetch", http_origin.url("/m/a.bin"))
    assert result.returncode == 0, result.stderr
    (delay,) = _delays(result.stderr)
    assert delay >= 1.0  # the date is 2-3 s ahead once the answer is read


def test_a_retry_after_beyond_the_limit_fails_at_once(tmp_path, http_origin) -> None:
    http_origin.put("/m/a.bin", os.urandom(BLOCK))
    http_origin.fail_next(1, 503, "/m/a.bin", headers={"Retry-After": "3600"})
    result = _cli(_config(tmp_path), "prefetch", http_origin.url("/m/a.bin"))
    assert result.returncode == 1
    assert "asks to wait 3600s before a retry (Retry-After)" in result.stderr
    assert "longer than retry.max_retry_after (120s)" in result.stderr
    assert len(http_origin.gets("/m/a.bin")) == 1  # not retried


def test_s3_slowdown_backs_off_at_least_the_throttle_delay(tmp_path, s3) -> None:
    s3.put("m/a.bin", os.urandom(BLOCK))
    s3.fail_next(2, 503, key="m/a.bin")  # SlowDown, twice
    config = _config(tmp_path, retry={"throttle_delay": 0.5})
    result = _cli(config, "-v", "prefetch", s3.url("m/a.bin"), env=s3.env())
    assert result.returncode == 0, result.stderr
    assert "SlowDown" in result.stderr
    delays = _delays(result.stderr)
    assert len(delays) == 2 and all(d >= 0.5 for d in delays), delays


# -- a dripping body ------------------------------------------------------------------


def test_a_dripping_body_is_abandoned_and_fetched_again(tmp_path, http_origin) -> None:
    data = os.urandom(2 * BLOCK)
    http_origin.put("/m/slow.bin", data)
    http_origin.drip_next(1, "/m/slow.bin", bytes_per_second=4000)
    # 1 s of grace plus 64 KiB at 64 KiB/s: the dripping GET is cut after about 2 s.
    config = _config(tmp_path, concurrency=1, retry={"timeout": 1, "min_rate": BLOCK})
    result = _cli(config, "-v", "prefetch", http_origin.url("/m/slow.bin"))
    assert result.returncode == 0, result.stderr
    assert "too slowly (below retry.min_rate, 65536 bytes/s); abandoned, to retry" in result.stderr
    # The server notices the hang-up at its next write.
    wait_for(lambda: [r for r in http_origin.requests if r.method == "GET" and r.aborted], 30)
    assert len(http_origin.gets("/m/slow.bin")) == 3  # the abandoned one, again, block 1
    import fsspec

    with fsspec.open(
        f"cachefs::{http_origin.url('/m/slow.bin')}", cachefs={"config": str(config)}
    ) as f:
        assert f.read() == data


# -- a dead origin: the circuit breaker -----------------------------------------------


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once closed


def test_a_dead_origin_fails_fast_then_is_probed_again(start_node, tmp_path, http_origin) -> None:
    port = _dead_port()
    dead = f"http://127.0.0.1:{port}/m/a.bin"
    config = _config(
        tmp_path,
        allow_redirects_to=["127.0.0.1/32"],
        retry={"attempts": 2, "base_delay": 0, "breaker_failures": 3, "breaker_cooldown": 3600},
    )
    node = start_node(tmp_path / "cache", config=config)
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    outcomes = []
    for _ in range(5):
        with pytest.raises(OSError) as failed:
            client.stat(dead)
        outcomes.append(str(failed.value))
    # Three requests make all their attempts and fail; that opens the breaker.
    for outcome in outcomes[:3]:
        assert "kept failing after 2 attempts" in outcome
        assert "connection to the origin failed" in outcome
    for outcome in outcomes[3:]:
        assert f"the origin http://127.0.0.1:{port} is failing (3 requests in a row" in outcome
        assert "cachefs fails fast for" in outcome and "then probes it again" in outcome
    assert node.metric("cachefs_origin_breakers_open") == 1
    assert node.metric("cachefs_origin_fail_fast_total") == 2
    # Another host is not affected.
    http_origin.put("/m/ok.bin", b"ok")
    assert client.stat(http_origin.url("/m/ok.bin")).size == 2
    client.close()


def test_the_probe_after_the_cooldown_closes_the_breaker(start_node, tmp_path, http_origin) -> None:
    http_origin.put("/m/a.bin", b"abc")
    url = http_origin.url("/m/a.bin")
    config = _config(
        tmp_path,
        retry={"attempts": 1, "breaker_failures": 2, "breaker_cooldown": 1},
    )
    node = start_node(tmp_path / "cache", config=config)
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    http_origin.fail_next(2, 503, "/m/a.bin", methods=("HEAD",))
    for _ in range(2):
        with pytest.raises(OSError, match="HTTP 503"):
            client.stat(url)
    with pytest.raises(OSError, match="fails fast"):
        client.stat(url)
    heads = http_origin.heads("/m/a.bin")
    # Once the cooldown ends, one probe goes through, succeeds, and closes the breaker.
    assert wait_for(lambda: _stat_or_none(client, url), 30).size == 3
    assert http_origin.heads("/m/a.bin") == heads + 1
    assert node.metric("cachefs_origin_breakers_open") == 0
    client.close()


def _stat_or_none(client: NodeClient, url: str) -> Any:
    try:
        return client.stat(url)
    except OSError:
        return None


# -- one limit on origin requests ------------------------------------------------------


def test_prefetches_and_readers_share_one_limit_on_origin_requests(
    start_node, tmp_path, s3
) -> None:
    files = {name: os.urandom(4 * BLOCK) for name in ("a", "c", "d")}
    for name, data in files.items():
        s3.put(f"m/{name}.bin", data)
    config = _config(tmp_path, concurrency=2, origin_connections=3)
    node = start_node(tmp_path / "cache", config=config, env=s3.env())
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    readers = []
    with s3.hold_gets(None) as gate:
        job = client.prefetch([s3.url("m/a.bin")], detach=True)
        gate.wait_held(2)  # the job's two fill threads
        readers.append(_reader(node, s3.url("m/c.bin"), files["c"]))
        gate.wait_held(3)  # a reader fills its first block in its own thread
        assert node.metric("cachefs_origin_slot_waits_total") == 0
        readers.append(_reader(node, s3.url("m/d.bin"), files["d"]))
        # The second reader finds every slot taken and waits: no fourth GET.
        wait_for(lambda: node.metric("cachefs_origin_slot_waits_total") == 1, 30)
        assert node.metric("cachefs_origin_requests_in_flight", operation="read") == 3
        assert node.metric("cachefs_origin_connections_limit") == 3
        assert gate.held == 3
    for reader in readers:
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0 and out == b"ok\n", err
    assert client.wait(job.id).state == "succeeded"
    client.close()


_READ = """
import hashlib, sys
from cachefs.client import NodeClient
client = NodeClient(sys.argv[1], token="", tls_ca="")
info = client.stat(sys.argv[2])
data = client.read(info, 0, info.size)
print("ok" if hashlib.sha256(data).hexdigest() == sys.argv[3] else "wrong bytes")
"""


def _reader(node: Any, url: str, data: bytes) -> subprocess.Popen[bytes]:
    import hashlib

    return subprocess.Popen(
        [sys.executable, "-c", _READ, node.unix_endpoint, url, hashlib.sha256(data).hexdigest()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# -- deleted objects ------------------------------------------------------------------


def _origin(kind: str, tmp_path: Path, s3: Any, http_origin: Any) -> tuple[str, Any, dict]:
    """(URL, delete function, env) of one object ``data`` at an origin of ``kind``."""
    if kind == "s3":
        return s3.url("m/gone.bin"), lambda: s3.delete("m/gone.bin"), s3.env()
    if kind == "http":
        return http_origin.url("/m/gone.bin"), lambda: http_origin.delete("/m/gone.bin"), {}
    path = tmp_path / "origin" / "gone.bin"
    return f"file://{path}", path.unlink, {}


@pytest.mark.parametrize("kind", ["s3", "http", "file"])
def test_a_deleted_object_is_served_until_revalidated_then_not_found(
    kind, start_node, tmp_path, s3, http_origin
) -> None:
    data = os.urandom(3 * BLOCK)
    url, delete, env = _origin(kind, tmp_path, s3, http_origin)
    if kind == "s3":
        s3.put("m/gone.bin", data)
    elif kind == "http":
        http_origin.put("/m/gone.bin", data)
    else:
        (tmp_path / "origin").mkdir()
        (tmp_path / "origin" / "gone.bin").write_bytes(data)
    cache = tmp_path / "cache"
    long = _config(tmp_path, revalidate_after=3600)
    node = start_node(cache, config=long, env=env)
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    assert client.prefetch([url]).state == "succeeded"
    delete()
    # Until the next revalidation, the complete cached copy is served.
    info = client.stat(url)
    assert client.read(info, 0, len(data)) == data
    client.close()
    node.kill()

    # A node that revalidates (here: a fresh one, whose first stat asks the origin).
    node = start_node(cache, config=long, env=env, socket_path=tmp_path / "again.sock")
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    with pytest.raises(FileNotFoundError, match=r"gone\.bin"):
        client.stat(url)
    with pytest.raises(FileNotFoundError):
        client.read(info, 0, len(data))  # the pinned version is gone too
    with pytest.raises(FileNotFoundError):
        client.open_local(url)
    with pytest.raises(FileNotFoundError):
        client.prefetch([url])
    client.close()
    cli = _cli_at(node, "ls", url)
    assert cli.returncode == 0 and url in cli.stdout  # the old copy is listed, not served
    cli = _cli_at(node, "prefetch", url)
    assert cli.returncode == 1 and "gone.bin" in cli.stderr, cli.stderr
