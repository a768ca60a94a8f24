"""The test servers and fixtures behave as other tests rely on them to."""

from __future__ import annotations

import errno
import http.client
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import fsspec
import pytest
import s3fs
from botocore.config import Config
from botocore.exceptions import ClientError
from helpers import Background
from servers import (
    TEST_ACCESS_KEY,
    NobodyRunner,
    RangeHTTPServer,
    S3Bucket,
    parse_range,
    wait_for,
)

DATA = bytes(range(256)) * 64  # 16 KiB with position-dependent bytes


def _client(**config: Any) -> Any:
    """A boto3 client configured only by the environment the ``s3`` fixture set."""
    return boto3.client("s3", config=Config(**config))


def _request(
    server: RangeHTTPServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request(method, server.url(path), headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


# ---------------------------------------------------------------- helpers


def test_parse_range() -> None:
    assert parse_range(None) is None
    assert parse_range("bytes=0-9") == (0, 9)
    assert parse_range("bytes=10-") == (10, None)
    assert parse_range("bytes=-5") == (-5, None)
    with pytest.raises(ValueError):
        parse_range("bytes=0-1,4-5")
    with pytest.raises(ValueError):
        parse_range("bytes=9-3")


def test_wait_for_returns_value_and_times_out() -> None:
    assert wait_for(lambda: 42) == 42
    with pytest.raises(AssertionError, match="never true"):
        wait_for(lambda: False, timeout=0.05, message="never true")


# --------------------------------------------------------------------- S3


def test_s3_env_points_clients_at_the_server(s3: S3Bucket) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint
    assert os.environ["AWS_ACCESS_KEY_ID"] == TEST_ACCESS_KEY
    s3.put("a.bin", DATA)
    body = _client().get_object(Bucket=s3.name, Key="a.bin")["Body"].read()
    assert body == DATA


def test_s3_boto3_gets_are_counted(s3: S3Bucket) -> None:
    s3.put("dir/a.bin", DATA)
    client = _client()
    part = client.get_object(Bucket=s3.name, Key="dir/a.bin", Range="bytes=10-19")
    assert part["Body"].read() == DATA[10:20]
    assert client.get_object(Bucket=s3.name, Key="dir/a.bin")["Body"].read() == DATA
    client.head_object(Bucket=s3.name, Key="dir/a.bin")
    client.list_objects_v2(Bucket=s3.name)
    assert s3.gets("dir/a.bin") == [(10, 19), None]
    assert s3.heads("dir/a.bin") == 1
    assert s3.gets("other") == []
    # The harness's own put is not logged; the listing is logged but is no object GET.
    assert [r.method for r in s3.requests] == ["GET", "GET", "HEAD", "GET"]
    s3.reset_requests()
    assert s3.gets("dir/a.bin") == []


def test_s3fs_ranged_reads_are_counted(s3: S3Bucket) -> None:
    s3.put("model/w.bin", DATA)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.cat_file(s3.url("model/w.bin"), start=100, end=200) == DATA[100:200]
    assert s3.gets("model/w.bin") == [(100, 199)]
    with fs.open(s3.url("model/w.bin"), "rb", block_size=4096, cache_type="none") as f:
        f.seek(8192)
        assert f.read(10) == DATA[8192:8202]
    assert s3.gets("model/w.bin")[1:] == [(8192, 8201)]


def test_s3_if_match_mismatch_is_412(s3: S3Bucket) -> None:
    etag = s3.put("k", DATA)
    client = _client()
    assert client.get_object(Bucket=s3.name, Key="k", IfMatch=etag)["Body"].read() == DATA
    s3.put("k", DATA[::-1])
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=s3.name, Key="k", IfMatch=etag)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert [r.if_match for r in s3.requests] == [etag, etag]
    assert [r.status for r in s3.requests] == [200, 412]


def test_s3_fail_next_then_recovers(s3: S3Bucket) -> None:
    s3.put("k", DATA)
    client = _client(retries={"total_max_attempts": 1, "mode": "standard"})
    s3.fail_next(1, 503, key="k")
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=s3.name, Key="k")
    assert info.value.response["Error"]["Code"] == "SlowDown"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert client.get_object(Bucket=s3.name, Key="k")["Body"].read() == DATA
    assert [r.status for r in s3.requests] == [503, 200]


def test_s3_fail_next_is_retried_by_botocore(s3: S3Bucket) -> None:
    s3.put("k", DATA)
    s3.put("other", b"x")
    s3.fail_next(1, 500, key="k")
    client = _client(retries={"total_max_attempts": 2, "mode": "standard"})
    assert client.get_object(Bucket=s3.name, Key="other")["Body"].read() == b"x"
    assert client.get_object(Bucket=s3.name, Key="k")["Body"].read() == DATA
    assert s3.gets("k") == [None, None]
    assert [r.status for r in s3.requests if r.key == "k"] == [500, 200]


def test_s3_gate_holds_get_across_an_overwrite(s3: S3Bucket) -> None:
    old, new = DATA, DATA[::-1]
    s3.put("k", old)
    client = _client()
    gate = s3.hold_gets("k", min_start=4096)
    late = Background(
        lambda: client.get_object(Bucket=s3.name, Key="k", Range="bytes=4096-4105")["Body"].read()
    )
    gate.wait_held(1)
    assert not late.done.is_set()
    # A range before min_start passes the gate while the other is held.
    early = client.get_object(Bucket=s3.name, Key="k", Range="bytes=0-9")["Body"].read()
    assert early == old[:10]
    s3.put("k", new)
    assert not late.done.is_set()
    gate.release()
    assert late.join() == new[4096:4106]
    assert gate.hits == 1 and not gate.timed_out
    assert s3.gets("k") == [(4096, 4105), (0, 9)]


# ------------------------------------------------------------------- HTTP


def test_http_ranges_and_headers(http_origin: RangeHTTPServer) -> None:
    http_origin.put("/m/a.bin", DATA[:1000])
    conn = http.client.HTTPConnection("127.0.0.1", http_origin.port, timeout=10)
    results = []
    # One connection for every request: the server keeps HTTP/1.1 connections alive.
    for header in ("bytes=10-19", "bytes=990-", "bytes=-5", "bytes=1000-1010", None):
        conn.request("GET", "/m/a.bin", headers={"Range": header} if header else {})
        response = conn.getresponse()
        results.append((response.status, response.getheader("Content-Range"), response.read()))
    assert results == [
        (206, "bytes 10-19/1000", DATA[10:20]),
        (206, "bytes 990-999/1000", DATA[990:1000]),
        (206, "bytes 995-999/1000", DATA[995:1000]),
        (416, "bytes */1000", b""),
        (200, None, DATA[:1000]),
    ]
    conn.request("HEAD", "/m/a.bin")
    head = conn.getresponse()
    head.read()
    conn.close()
    assert head.status == 200
    assert head.getheader("Content-Length") == "1000"
    assert head.getheader("Accept-Ranges") == "bytes"
    assert head.getheader("ETag") == http_origin.etag("/m/a.bin")
    assert head.getheader("Last-Modified") == http_origin.last_modified("m/a.bin")
    assert http_origin.gets("m/a.bin") == [(10, 19), (990, None), (-5, None), (1000, 1010), None]
    assert http_origin.heads("/m/a.bin") == 1
    assert _request(http_origin, "GET", "/missing")[0].status == 404


def test_http_etag_and_if_match(http_origin: RangeHTTPServer) -> None:
    first = http_origin.put("f.bin", DATA)
    assert first.startswith('"') and first.endswith('"')
    second = http_origin.put("f.bin", DATA[::-1])
    assert second != first
    assert _request(http_origin, "GET", "f.bin", {"If-Match": first})[0].status == 412
    response, body = _request(http_origin, "GET", "f.bin", {"If-Match": second})
    assert (response.status, body) == (200, DATA[::-1])
    http_origin.ignore_if_match = True
    response, body = _request(http_origin, "GET", "f.bin", {"If-Match": first})
    assert (response.status, body) == (200, DATA[::-1])


def test_http_without_etag_last_modified_still_changes(http_origin: RangeHTTPServer) -> None:
    http_origin.send_etag = False
    http_origin.put("f.bin", DATA)
    before = _request(http_origin, "HEAD", "f.bin")[0]
    http_origin.put("f.bin", DATA[::-1])
    after = _request(http_origin, "HEAD", "f.bin")[0]
    assert before.getheader("ETag") is None and after.getheader("ETag") is None
    assert before.getheader("Last-Modified") != after.getheader("Last-Modified")


def test_http_ignore_range_sends_whole_body(http_origin: RangeHTTPServer) -> None:
    http_origin.ignore_range = True
    http_origin.put("f.bin", DATA)
    response, body = _request(http_origin, "GET", "f.bin", {"Range": "bytes=0-9"})
    assert (response.status, body) == (200, DATA)


def test_http_directory_index_lists_with_fsspec(http_origin: RangeHTTPServer) -> None:
    for path in ("models/m1/config.json", "models/m1/w.bin", "models/m1/sub/x.bin", "top.bin"):
        http_origin.put(path, DATA[:100])
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    assert fs.ls(http_origin.url("models/m1/"), detail=False) == [
        http_origin.url("models/m1/config.json"),
        http_origin.url("models/m1/sub/"),
        http_origin.url("models/m1/w.bin"),
    ]
    assert fs.cat_file(http_origin.url("models/m1/w.bin"), start=5, end=15) == DATA[5:15]
    assert http_origin.gets("models/m1/w.bin") == [(5, 14)]
    assert _request(http_origin, "GET", "nothing/")[0].status == 404


def test_http_fail_next_then_recovers(http_origin: RangeHTTPServer) -> None:
    http_origin.put("f.bin", DATA)
    http_origin.fail_next(2, 503, path="f.bin")
    statuses = [_request(http_origin, "GET", "f.bin")[0].status for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert [r.status for r in http_origin.requests] == [503, 503, 200]


def test_http_reset_connection_breaks_the_body(http_origin: RangeHTTPServer) -> None:
    http_origin.put("f.bin", DATA)
    http_origin.reset_connection_next(1, "f.bin", after=100)
    conn = http.client.HTTPConnection("127.0.0.1", http_origin.port, timeout=10)
    conn.request("GET", "/f.bin")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()
    conn.close()
    assert info.value.partial == DATA[:100]
    http_origin.reset_connection_next(1)
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    with pytest.raises(aiohttp.ClientPayloadError):
        fs.cat_file(http_origin.url("f.bin"))
    assert fs.cat_file(http_origin.url("f.bin")) == DATA
    assert [r.aborted for r in http_origin.requests if r.method == "GET"] == [True, True, False]


def test_http_gate_blocks_until_released(http_origin: RangeHTTPServer) -> None:
    http_origin.put("f.bin", DATA)
    with http_origin.hold_gets("f.bin", min_start=1000) as gate:
        held = Background(
            lambda: _request(http_origin, "GET", "f.bin", {"Range": "bytes=1000-1009"})[1]
        )
        gate.wait_held(1)
        assert _request(http_origin, "GET", "f.bin", {"Range": "bytes=0-9"})[1] == DATA[:10]
        http_origin.put("f.bin", DATA[::-1])
        assert not held.done.is_set()
    assert held.join() == DATA[::-1][1000:1010]
    assert http_origin.gets("f.bin") == [(1000, 1009), (0, 9)]


# --------------------------------------------------------------- fixtures


def test_run_as_nobody_honours_file_modes(cache_dir: Path, run_as_nobody: NobodyRunner) -> None:
    private = cache_dir / "private"
    private.write_bytes(b"secret")
    private.chmod(0o600)
    shared = cache_dir / "shared"
    shared.write_bytes(b"public")
    shared.chmod(0o644)
    denied = run_as_nobody(["cat", str(private)])
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert run_as_nobody(["cat", str(shared)], check=True).stdout == "public"
    code = "import os, fsspec; print(os.getuid(), os.getgid(), os.getgroups())"
    assert run_as_nobody(code, check=True).stdout.split("\n")[0] == "65534 65534 []"


def test_small_tmpfs_fills_up(small_tmpfs: Callable[[int], Path]) -> None:
    mount = small_tmpfs(64 * 1024)
    assert os.path.ismount(mount)
    with pytest.raises(OSError) as info, open(mount / "big", "wb") as f:
        f.write(b"\0" * (256 * 1024))
        f.flush()
    assert info.value.errno == errno.ENOSPC
