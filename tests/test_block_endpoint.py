"""The peer block endpoint (HTTP/1.1, sendfile): what it answers, and what it refuses.

A node of a cluster serves blocks to its peers on ``block_port`` (its Status names
it). Requests are made here as a peer makes them, with ``http.client`` on a real
node; every value a request states is checked, and only the cluster token opens it.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import xxhash
import yaml
from daemon import TOKEN, loopback_addresses
from servers import self_signed_cert

from cachefs.client import NodeClient
from cachefs.node.cluster.block_wire import CHECKSUM_HEADER, PATH

BLOCK = 64 * 1024


def _node(start_node: Any, tmp_path: Path, address: str, members: list[str], **extra: Any) -> Any:
    env = extra.pop("env", None)
    name = address.replace(":", "-")
    cache = tmp_path / f"cache-{name}"
    config = tmp_path / f"node-{name}.yaml"
    settings = {
        "cache_dir": str(cache),
        "block_size": BLOCK,
        "cluster": {"membership": "static", "peers": members},
        **extra,
    }
    config.write_text(yaml.safe_dump(settings))
    return start_node(cache, config=config, tcp=address, env=env)


@pytest.fixture
def node(start_node, tmp_path, s3, monkeypatch) -> dict[str, Any]:
    """One node of a one-node cluster, with a cached object of 2 blocks and a bit."""
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    (address,) = loopback_addresses(1)
    data = os.urandom(2 * BLOCK + 100)
    s3.put("m/x.bin", data)
    started = start_node(
        tmp_path / "cache",
        config=_config(tmp_path, address),
        tcp=address,
        env=s3.env(),
    )
    client = NodeClient(started.unix_endpoint, token="", tls_ca="")
    info = client.stat(s3.url("m/x.bin"))
    assert client.read(info, 0, info.size) == data
    port = client.status().block_port
    assert port > 0
    host = address.rpartition(":")[0]
    query = {
        "url": info.url,
        "version": info.version,
        "size": info.size,
        "etag": info.version.removeprefix("etag:"),
        "block_size": BLOCK,
        "fill": "0",
        "forwarded": "0",
    }
    return {"host": host, "port": port, "data": data, "query": query, "node": started}


def _config(tmp_path: Path, address: str) -> Path:
    path = tmp_path / "node.yaml"
    settings = {
        "cache_dir": str(tmp_path / "cache"),
        "block_size": BLOCK,
        "cluster": {"membership": "static", "peers": [address]},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def _get(
    node: dict[str, Any],
    query: dict[str, Any] | None = None,
    start: int = BLOCK,
    end: int = 2 * BLOCK,
    token: str | None = TOKEN,
    path: str = PATH,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, str], bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection(node["host"], node["port"], timeout=30)
    headers = {"Range": f"bytes={start}-{end - 1}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("GET", f"{path}?{urlencode(query or node['query'])}", headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        if own:
            conn.close()


def test_a_block_comes_whole_with_its_checksum_on_a_kept_alive_connection(node) -> None:
    data = node["data"]
    conn = http.client.HTTPConnection(node["host"], node["port"], timeout=30)
    try:
        for index in (1, 2, 0):  # one connection, three requests
            start, end = index * BLOCK, min((index + 1) * BLOCK, len(data))
            status, headers, body = _get(node, start=start, end=end, conn=conn)
            assert status == 206
            assert body == data[start:end]
            assert headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
            assert int(headers[CHECKSUM_HEADER], 16) == xxhash.xxh3_64_intdigest(body)
    finally:
        conn.close()
    assert node["node"].metric("cachefs_peer_served_bytes_total") == len(data)


@pytest.mark.parametrize(
    ("token", "fragment"),
    [(None, "no token was presented"), ("wrong-" + TOKEN, "the token is wrong"), ("", "no token")],
)
def test_only_the_cluster_token_opens_it(node, token: str | None, fragment: str) -> None:
    status, headers, body = _get(node, token=token)
    assert status == 401 and headers["cachefs-error"] == "PermissionError"
    assert fragment in body.decode()
    assert TOKEN not in body.decode()


@pytest.mark.parametrize(
    ("change", "span", "fragment"),
    [
        ({"block_size": 1024 * 1024 * 1024}, (0, 2 * BLOCK + 100), "not this node's"),
        ({}, (3 * BLOCK, 4 * BLOCK), "no block 3"),
        ({}, (100, BLOCK + 100), "not one block"),
        ({}, (0, 2 * BLOCK), "not one block"),  # two blocks at once
        ({}, (2 * BLOCK, 3 * BLOCK), "not one block"),  # past the end of the last one
        ({"size": "-1"}, (0, BLOCK), "size must be a whole number"),
        ({"block_size": "0"}, (0, BLOCK), "block_size must be positive"),
        ({"url": "s3://"}, (0, BLOCK), ""),
        ({"url": "http://user:secret@example.com/x"}, (0, BLOCK), "credentials"),
    ],
)
def test_stated_values_are_checked(
    node, change: dict[str, Any], span: tuple[int, int], fragment: str
) -> None:
    status, headers, body = _get(node, {**node["query"], **change}, *span)
    assert status == 400, (status, body)
    assert headers["cachefs-error"] == "ValueError"
    assert fragment in body.decode()
    assert "secret" not in body.decode()


@pytest.mark.parametrize(
    ("query_change", "range_header", "path", "status"),
    [
        ({"url": None}, "bytes=0-65535", PATH, 400),  # a value missing
        ({}, "bytes=0-", PATH, 400),
        ({}, "items=0-65535", PATH, 400),
        ({}, "bytes=65535-0", PATH, 400),
        ({}, "bytes=0-65535", "/v1/other", 404),
    ],
)
def test_malformed_requests_are_refused(
    node, query_change: dict[str, Any], range_header: str, path: str, status: int
) -> None:
    query = {k: v for k, v in {**node["query"], **query_change}.items() if v is not None}
    conn = http.client.HTTPConnection(node["host"], node["port"], timeout=30)
    try:
        conn.request(
            "GET",
            f"{path}?{urlencode(query)}",
            headers={"Range": range_header, "Authorization": f"Bearer {TOKEN}"},
        )
        response = conn.getresponse()
        assert response.status == status, response.read()
    finally:
        conn.close()


def test_a_block_not_cached_is_not_found_without_fill(node, s3) -> None:
    s3.put("m/cold.bin", os.urandom(BLOCK))
    info = NodeClient(node["node"].unix_endpoint, token="", tls_ca="").stat(s3.url("m/cold.bin"))
    query = {**node["query"], "url": info.url, "version": info.version, "size": info.size}
    query["etag"] = info.version.removeprefix("etag:")
    status, headers, _body = _get(node, query, 0, BLOCK)
    assert status == 404 and headers["cachefs-error"] == "FileNotFoundError"
    assert s3.gets("m/cold.bin") == []  # cached_only: the origin was not asked
    status, _headers, body = _get(node, {**query, "fill": "1", "forwarded": "1"}, 0, BLOCK)
    assert status == 206 and len(body) == BLOCK


def test_two_nodes_move_blocks_over_tls(start_node, tmp_path, s3, monkeypatch) -> None:
    """With a certificate, the block endpoint speaks TLS and peers check it with the
    cluster's CA: a block still goes from the owner to the other node."""
    addresses = loopback_addresses(2)
    cert, key = self_signed_cert(tmp_path, hosts=[a.rpartition(":")[0] for a in addresses])
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    monkeypatch.setenv("CACHEFS_TLS_CA", str(cert))
    data = os.urandom(8 * BLOCK)
    s3.put("m/tls.bin", data)
    tls = {"server": {"tls_cert": str(cert), "tls_key": str(key)}}
    env = {**s3.env(), "CACHEFS_TLS_CA": str(cert)}
    nodes = [
        _node(start_node, tmp_path, address, addresses, env=env, **tls) for address in addresses
    ]
    first = NodeClient(nodes[0].unix_endpoint, token="", tls_ca="")
    info = first.stat(s3.url("m/tls.bin"))
    assert first.read(info, 0, info.size) == data
    second = NodeClient(nodes[1].unix_endpoint, token="", tls_ca="")
    assert second.read(second.stat(s3.url("m/tls.bin")), 0, info.size) == data
    assert second.status().served_bytes.get("peer", 0) > 0  # some blocks came from the first
    assert len(s3.gets("m/tls.bin")) == 8  # every block from the origin once
