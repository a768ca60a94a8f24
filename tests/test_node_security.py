"""Security of the node daemon, with real ``cachefs node`` processes and a real S3 origin.

TLS on the TCP listener, the shared token (also from a file) that never reaches a log
or a metric, origin credentials that stay in the daemon, reads pinned to one version
across processes, client deadlines, and who may connect to the unix socket.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import fsspec
import pytest
from daemon import TOKEN
from servers import NOBODY_GID, TEST_SECRET_KEY, NobodyRunner, self_signed_cert, wait_for

from cachefs.client import NodeClient
from cachefs.errors import NodeUnavailableError, VersionChangedError

BLOCK = 256 * 1024


def _config(
    tmp_path: Path, cache_dir: Path, server: dict[str, Any] | None = None, **top: Any
) -> Path:
    """A node config with 256 KiB blocks; ``top`` adds top-level keys."""
    import yaml

    path = tmp_path / "node.yaml"
    settings = {"cache_dir": str(cache_dir), "block_size": BLOCK, "server": server or {}, **top}
    path.write_text(yaml.safe_dump(settings))
    return path


def _fs(endpoint: str, **options: Any) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("cachefs", endpoint=endpoint, skip_instance_cache=True, **options)


def _node_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cachefs node`` to its end (for configurations that must not start)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cachefs.cli", "node", *args],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# -- TLS ---------------------------------------------------------------------------


@pytest.fixture
def tls_node(start_node, tmp_path, s3, monkeypatch) -> dict[str, Any]:
    """A node whose TCP listener speaks TLS, an object to read, and this client's token."""
    cert, key = self_signed_cert(tmp_path, "node")
    other_cert, _ = self_signed_cert(tmp_path, "other")
    cache = tmp_path / "cache"
    config = _config(tmp_path, cache, server={"tls_cert": str(cert), "tls_key": str(key)})
    node = start_node(cache, config=config, extra_args=("-v",))
    data = os.urandom(2 * BLOCK + 321)
    s3.put("tls.bin", data)
    monkeypatch.setenv("CACHEFS_TOKEN", TOKEN)
    monkeypatch.delenv("CACHEFS_TLS_CA", raising=False)
    return {
        "node": node,
        "cert": cert,
        "other_cert": other_cert,
        "url": s3.url("tls.bin"),
        "data": data,
    }


def test_tls_clients_need_the_ca_and_plaintext_is_refused(tls_node, monkeypatch) -> None:
    node, url, data = tls_node["node"], tls_node["url"], tls_node["data"]

    monkeypatch.setenv("CACHEFS_TLS_CA", str(tls_node["cert"]))
    assert _fs(node.tcp_endpoint, local_reads=False).cat_file(url) == data
    assert NodeClient(node.tcp_endpoint, timeout=5).stat(url).size == len(data)

    # A client that trusts another CA does not accept the node's certificate.
    monkeypatch.setenv("CACHEFS_TLS_CA", str(tls_node["other_cert"]))
    with pytest.raises(NodeUnavailableError, match="unavailable"):
        NodeClient(node.tcp_endpoint, timeout=5).stat(url)

    # Plaintext against a TLS listener: a clear error within the deadline, no hang.
    monkeypatch.delenv("CACHEFS_TLS_CA")
    with pytest.raises(NodeUnavailableError, match=node.tcp_endpoint) as plain:
        NodeClient(node.tcp_endpoint, timeout=5).stat(url)
    assert "cachefs node" in str(plain.value)
    with pytest.raises(NodeUnavailableError):
        _fs(node.tcp_endpoint, local_reads=False, timeout=5).cat_file(url)

    # The unix socket is unaffected by TLS.
    assert _fs(node.unix_endpoint, local_reads=False).cat_file(url) == data
    assert node.process.poll() is None


def test_filesystem_clients_follow_the_ca_configured_now(tls_node, monkeypatch) -> None:
    node, url, data = tls_node["node"], tls_node["url"], tls_node["data"]
    monkeypatch.setenv("CACHEFS_TLS_CA", str(tls_node["cert"]))
    assert _fs(node.tcp_endpoint, local_reads=False, timeout=5).cat_file(url) == data

    # A filesystem made after the CA changed must not reuse the channel that trusted
    # the old one: the node's certificate is checked against the new CA, and refused.
    monkeypatch.setenv("CACHEFS_TLS_CA", str(tls_node["other_cert"]))
    with pytest.raises(NodeUnavailableError):
        _fs(node.tcp_endpoint, local_reads=False, timeout=5).cat_file(url)
    # Without a CA the client speaks plaintext, which the TLS listener refuses.
    monkeypatch.delenv("CACHEFS_TLS_CA")
    with pytest.raises(NodeUnavailableError):
        _fs(node.tcp_endpoint, local_reads=False, timeout=5).cat_file(url)


def test_failed_tls_handshakes_keep_the_log_json(tls_node, monkeypatch) -> None:
    node, url = tls_node["node"], tls_node["url"]
    with pytest.raises(NodeUnavailableError):  # plaintext
        NodeClient(node.tcp_endpoint, timeout=5).stat(url)
    monkeypatch.setenv("CACHEFS_TLS_CA", str(tls_node["other_cert"]))
    with pytest.raises(NodeUnavailableError):  # a CA that did not sign the node's cert
        NodeClient(node.tcp_endpoint, timeout=5).stat(url)

    # A call after them, so that whatever they made the node write is read by now.
    NodeClient(node.unix_endpoint, timeout=10).status()
    wait_for(
        lambda: any('"method": "Status"' in line for line in list(node.lines)),
        message="the Status call's log line",
    )
    assert [line for line in list(node.lines) if not _is_json_object(line)] == []


def test_tls_cert_without_key_refuses_to_start(tmp_path) -> None:
    cert, _key = self_signed_cert(tmp_path, "node")
    cache = tmp_path / "cache"
    config = _config(tmp_path, cache, server={"tls_cert": str(cert)})
    result = _node_command(
        "--config",
        str(config),
        "--socket",
        str(tmp_path / "tls.sock"),
        "--address",
        "127.0.0.1:0",
        env={"CACHEFS_TOKEN": TOKEN},
    )
    assert result.returncode != 0
    assert "tls_key" in result.stderr, result.stderr
    assert "serving" not in result.stderr


# -- the token ---------------------------------------------------------------------


def test_tcp_without_a_token_refuses_to_start(tmp_path) -> None:
    result = _node_command(
        "--cache-dir",
        str(tmp_path / "cache"),
        "--socket",
        str(tmp_path / "notoken.sock"),
        "--address",
        "127.0.0.1:0",
    )
    assert result.returncode != 0
    assert "CACHEFS_TOKEN" in result.stderr, result.stderr
    assert "serving" not in result.stderr


@pytest.mark.exercises("CACHEFS_TOKEN_FILE")
def test_token_file_works_and_never_leaks(start_node, tmp_path, s3, monkeypatch) -> None:
    secret = "file-token-8c2e77a1"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    cache = tmp_path / "cache"
    node = start_node(
        cache,
        config=_config(tmp_path, cache),
        token=None,
        env={"CACHEFS_TOKEN_FILE": str(token_file)},
        extra_args=("-v",),  # debug lines too: the token is in none of them
    )
    data = os.urandom(BLOCK + 17)
    s3.put("tok.bin", data)
    url = s3.url("tok.bin")

    monkeypatch.delenv("CACHEFS_TOKEN", raising=False)
    monkeypatch.setenv("CACHEFS_TOKEN_FILE", str(token_file))
    assert _fs(node.tcp_endpoint, local_reads=False).cat_file(url) == data
    # The node read the file's token without its newline: the bare token works too.
    monkeypatch.delenv("CACHEFS_TOKEN_FILE")
    monkeypatch.setenv("CACHEFS_TOKEN", secret)
    assert NodeClient(node.tcp_endpoint, timeout=10).stat(url).size == len(data)
    # And the token is checked: another one is refused.
    monkeypatch.setenv("CACHEFS_TOKEN", secret + "x")
    with pytest.raises(PermissionError, match="CACHEFS_TOKEN") as refused:
        NodeClient(node.tcp_endpoint, timeout=10).stat(url)
    assert secret not in str(refused.value)

    with urllib.request.urlopen(node.metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    assert "cachefs_rpcs_total" in metrics
    assert secret not in metrics
    assert node.lines and all(secret not in line for line in node.lines)


# -- origin credentials --------------------------------------------------------------

BOGUS_SECRET = "BOGUS-SECRET-do-not-send-3a9f"

CLEAN_ENV_READER = """
import hashlib, os, sys, fsspec
assert not [name for name in os.environ if name.startswith("AWS_")]
fs = fsspec.filesystem("cachefs", endpoint=sys.argv[1], local_reads=False)
print(hashlib.sha256(fs.cat_file(sys.argv[2])).hexdigest())
"""


def test_origin_credentials_stay_in_the_node(start_node, tmp_path, s3) -> None:
    import hashlib

    cache = tmp_path / "cache"
    node = start_node(cache, config=_config(tmp_path, cache), extra_args=("-v",))
    data = os.urandom(2 * BLOCK + 5)
    s3.put("creds/model.bin", data)

    # Storage options given to the client are never sent: the node uses its own.
    fs = fsspec.filesystem(
        "cachefs",
        endpoint=node.unix_endpoint,
        target_protocol="s3",
        target_options={
            "key": "BOGUS",
            "secret": BOGUS_SECRET,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        },
        local_reads=False,
        skip_instance_cache=True,
    )
    assert fs.cat_file(f"{s3.name}/creds/model.bin") == data
    assert fs.info(f"{s3.name}/creds/model.bin")["size"] == len(data)
    assert s3.gets("creds/model.bin")  # the node fetched it from the real origin

    # A client process with no AWS credentials at all reads through the node.
    script = tmp_path / "reader.py"
    script.write_text(CLEAN_ENV_READER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CACHEFS_"))}
    result = subprocess.run(
        [sys.executable, str(script), node.unix_endpoint, s3.url("creds/model.bin")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(data).hexdigest()

    assert node.lines and all(BOGUS_SECRET not in line for line in node.lines)
    assert all(TEST_SECRET_KEY not in line for line in node.lines)


# -- versions across processes ---------------------------------------------------------


def test_overwrite_during_a_read_is_version_changed_never_mixed(start_node, tmp_path, s3) -> None:
    cache = tmp_path / "cache"
    # Every open revalidates, and no read-ahead fills old blocks before the overwrite.
    config = _config(tmp_path, cache, revalidate_after=0, readahead_blocks=0)
    node = start_node(cache, config=config)
    old = os.urandom(4 * BLOCK)
    new = os.urandom(4 * BLOCK)
    s3.put("v.bin", old)
    fs = _fs(node.unix_endpoint, local_reads=False)

    with fs.open(s3.url("v.bin"), block_size=BLOCK // 4) as f:
        assert f.read(1000) == old[:1000]
        s3.put("v.bin", new)
        with pytest.raises(VersionChangedError) as caught:
            f.read()
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ESTALE
    assert "v.bin" in str(caught.value)

    # The node fetched nothing of the new version for the old reader.
    etags = {r.if_match for r in s3.requests if r.object_get and r.key == "v.bin"}
    assert len(etags) == 1 and None not in etags

    with fs.open(s3.url("v.bin"), block_size=BLOCK // 4) as f:
        assert f.read() == new
    assert fs.cat_file(s3.url("v.bin")) == new


# -- deadlines -------------------------------------------------------------------------


def test_client_deadline_with_a_held_origin_get(start_node, tmp_path, s3) -> None:
    cache = tmp_path / "cache"
    node = start_node(cache, config=_config(tmp_path, cache))
    data = os.urandom(2 * BLOCK)
    s3.put("held.bin", data)
    s3.put("free.bin", b"f" * 1000)
    fs = _fs(node.unix_endpoint, local_reads=False, timeout=2)

    with s3.hold_gets("held.bin") as gate:
        with pytest.raises(TimeoutError, match="deadline") as caught:
            fs.cat_file(s3.url("held.bin"))
        assert caught.value.errno == errno.ETIMEDOUT
        assert gate.hits >= 1  # the read was waiting on the origin, not failing early
        # While the GET is still held, the node answers other calls.
        assert fs.cat_file(s3.url("free.bin")) == b"f" * 1000

    assert node.process.poll() is None
    assert (
        _fs(node.unix_endpoint, local_reads=False, timeout=30).cat_file(s3.url("held.bin")) == data
    )


# -- the unix socket's mode and group -------------------------------------------------


def test_socket_mode_from_the_config(start_node, tmp_path) -> None:
    cache = tmp_path / "cache"
    node = start_node(cache, config=_config(tmp_path, cache, server={"socket_mode": "0640"}))
    assert node.socket_path.stat().st_mode & 0o777 == 0o640
    assert NodeClient(node.unix_endpoint, timeout=10).status().tiers


@pytest.mark.parametrize("mode", ["0666", "0604", "rw-rw----"])
def test_bad_socket_mode_refuses_to_start(tmp_path, mode: str) -> None:
    cache = tmp_path / "cache"
    config = _config(tmp_path, cache, server={"socket_mode": mode})
    socket_path = tmp_path / "bad.sock"
    result = _node_command("--config", str(config), "--socket", str(socket_path))
    assert result.returncode != 0
    assert "socket_mode" in result.stderr, result.stderr
    assert not socket_path.exists()


STATUS_PROBE = """
import os
from cachefs.client import NodeClient
from cachefs.errors import NodeUnavailableError
try:
    status = NodeClient(os.environ["PROBE_ENDPOINT"], timeout=5).status()
except (NodeUnavailableError, PermissionError) as exc:
    print("refused", type(exc).__name__)
else:
    print("ok", status.node_id)
"""


def test_other_users_cannot_connect_to_the_socket(
    start_node, tmp_path, run_as_nobody: NobodyRunner
) -> None:
    cache = tmp_path / "cache"
    private = start_node(cache, config=_config(tmp_path, cache), extra_args=("--node-id", "p"))
    assert private.socket_path.stat().st_mode & 0o777 == 0o660
    assert private.socket_path.stat().st_uid == os.geteuid()
    denied = run_as_nobody(STATUS_PROBE, env={"PROBE_ENDPOINT": private.unix_endpoint})
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout.split()[0] == "refused", denied.stdout

    # The same user is let in through the socket's group: the refusal above was the mode.
    shared_cache = tmp_path / "shared-cache"
    (tmp_path / "shared").mkdir()
    config = _config(tmp_path / "shared", shared_cache, server={"socket_group": str(NOBODY_GID)})
    shared = start_node(shared_cache, config=config, extra_args=("--node-id", "shared"))
    assert shared.socket_path.stat().st_gid == NOBODY_GID
    allowed = run_as_nobody(STATUS_PROBE, env={"PROBE_ENDPOINT": shared.unix_endpoint})
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.split() == ["ok", "shared"], allowed.stdout
