"""Documented flags and variables that no other test ran the way a user does.

Every test here runs ``cachefs`` as a subprocess (nodes too) and asserts the name's
observable effect: ``--peers`` makes a static cluster that ``prefetch --cluster`` fills
with one origin GET per block, ``CACHEFS_RETRY__ATTEMPTS`` is the retry count in effect,
``-v`` logs the retries, ``CACHEFS_TLS_CA`` is the CA a CLI client trusts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import TOKEN, loopback_addresses
from servers import RangeHTTPServer, S3Bucket, self_signed_cert

BLOCK = 64 * 1024
Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """``cli(*args, env={...})``: ``python -m cachefs.cli`` with no inherited CACHEFS_
    variable and a private HOME, so only what the test passes counts."""
    home = tmp_path / "home"
    home.mkdir()

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
        environment.pop("XDG_CACHE_HOME", None)
        environment.update(HOME=str(home), **(env or {}))
        return subprocess.run(
            [sys.executable, "-m", "cachefs.cli", *args],
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def _json_lines(result: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return [json.loads(line) for line in result.stdout.splitlines()]


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``cachefs: error:`` line of a command that exited 1."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachefs: error: "), result.stderr
    return lines[0]


# -- --peers: a static cluster from the command line -------------------------------------


@pytest.mark.exercises(
    "--peers",
    "--address",
    "--socket",
    "--cache-dir",
    "--cluster",
    "--endpoint",
    "--json",
    "CACHEFS_ENDPOINT",
    "CACHEFS_TOKEN",
    "CACHEFS_<KEY>",
)
def test_peers_make_a_static_cluster_that_a_cli_cluster_prefetch_fills(
    start_node, tmp_path: Path, s3: S3Bucket, cli: Cli
) -> None:
    addresses = loopback_addresses(3)
    nodes = [
        start_node(
            tmp_path / f"cache-{index}",
            tcp=address,
            metrics=False,
            socket_path=tmp_path / f"node-{index}.sock",
            env={"CACHEFS_BLOCK_SIZE": "64KiB"},
            extra_args=("--peers", ",".join(addresses)),
        )
        for index, address in enumerate(addresses)
    ]
    files = {
        "model/a.bin": os.urandom(5 * BLOCK + 100),
        "model/b.bin": os.urandom(3 * BLOCK),
        "model/c.bin": os.urandom(700),
    }
    for key, data in files.items():
        s3.put(key, data)
    s3.reset_requests()

    prefetch = cli("prefetch", "--cluster", "--json", "--endpoint", nodes[0].unix_endpoint,
                   s3.url("model/"))  # fmt: skip
    assert _json_lines(prefetch)[-1]["event"] == "done"
    for node in nodes:
        listed = _json_lines(cli("ls", "--json", env={"CACHEFS_ENDPOINT": node.unix_endpoint}))
        assert {entry["url"]: entry["complete"] for entry in listed} == {
            s3.url(key): True for key in files
        }, node.socket_path
    for key, data in files.items():  # each block from the origin once, for three nodes
        gets = s3.gets(key)
        assert len(gets) == len(set(gets)) == -(-len(data) // BLOCK), (key, gets)


@pytest.mark.exercises("--peers", "--config")
def test_peers_override_the_configured_membership(
    start_node, tmp_path: Path, s3: S3Bucket, cli: Cli
) -> None:
    (address,) = loopback_addresses(1)
    cache = tmp_path / "cache"
    config = tmp_path / "node.yaml"
    unreachable = {"membership": "static", "peers": ["127.0.0.9:9"]}
    config.write_text(yaml.safe_dump({"cache_dir": str(cache), "cluster": unreachable}))
    node = start_node(cache, config=config, tcp=address, metrics=False,
                      extra_args=("--peers", address))  # fmt: skip
    s3.put("one.bin", b"1" * 1000)
    done = cli("prefetch", "--cluster", "--json", "--endpoint", node.unix_endpoint,
               s3.url("one.bin"))  # fmt: skip
    assert _json_lines(done)[-1]["event"] == "done"


@pytest.mark.exercises("--peers")
@pytest.mark.parametrize(
    ("peers", "named"),
    [
        ("nohost", "--peers entry 'nohost' is not HOST:PORT"),
        ("127.0.0.1:7070,127.0.0.2:http", "--peers entry '127.0.0.2:http' is not HOST:PORT"),
        ("127.0.0.1:7070,[::1]:70000", "--peers entry '[::1]:70000' is not HOST:PORT"),
        (" , ", "--peers names no node"),
    ],
)
def test_a_bad_peers_entry_is_a_one_line_error(
    tmp_path: Path, cli: Cli, peers: str, named: str
) -> None:
    socket_path = tmp_path / "node.sock"
    result = cli(
        "node",
        "--socket",
        str(socket_path),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--address",
        "127.0.0.1:0",
        "--peers",
        peers,
        env={"CACHEFS_TOKEN": TOKEN},
    )
    line = _error_line(result)
    assert named in line and "write --peers HOST:PORT,HOST:PORT,..." in line, line
    assert not socket_path.exists()


# -- the retry policy from the environment, and -v ---------------------------------------


@pytest.mark.exercises("CACHEFS_<SECTION>__<KEY>", "CACHEFS_RETRY__ATTEMPTS", "-v")
def test_retry_attempts_from_the_environment_and_v_logs_each_retry(
    tmp_path: Path, http_origin: RangeHTTPServer, cli: Cli
) -> None:
    http_origin.put("/w.bin", os.urandom(1000))
    url, cache = http_origin.url("/w.bin"), str(tmp_path / "cache")
    env = {
        "CACHEFS_RETRY__ATTEMPTS": "8",  # the README's example; the default is 5
        "CACHEFS_RETRY__BASE_DELAY": "0.01",
        "CACHEFS_RETRY__MAX_DELAY": "0.01",
    }
    http_origin.fail_next(8, 503, "/w.bin")
    failed = cli("-v", "--cache-dir", cache, "prefetch", url, env=env)
    assert failed.returncode == 1, failed.stderr
    *logged, error = failed.stderr.splitlines()
    assert error.startswith("cachefs: error: ") and "after 8 attempts" in error, error
    assert len([line for line in logged if re.search(r"retry \d of 7\b", line)]) == 7, logged
    assert len(http_origin.gets("/w.bin")) == 8

    http_origin.fail_next(7, 503, "/w.bin")  # the eighth attempt gets the bytes
    done = cli("--cache-dir", cache, "prefetch", url, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # without -v the retries are not logged
    assert len(http_origin.gets("/w.bin")) == 16


# -- a CLI client of a TLS listener ------------------------------------------------------


@pytest.mark.exercises("CACHEFS_TLS_CA", "CACHEFS_TOKEN", "CACHEFS_TOKEN_FILE", "--endpoint")
def test_a_cli_client_trusts_the_ca_in_cachefs_tls_ca(start_node, tmp_path: Path, cli: Cli) -> None:
    cert, key = self_signed_cert(tmp_path, "node")
    other, _ = self_signed_cert(tmp_path, "other")
    cache = tmp_path / "cache"
    config = tmp_path / "node.yaml"
    server = {"tls_cert": str(cert), "tls_key": str(key)}
    config.write_text(yaml.safe_dump({"cache_dir": str(cache), "server": server}))
    endpoint = start_node(cache, config=config, metrics=False).tcp_endpoint
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    trusted = {"CACHEFS_TLS_CA": str(cert), "CACHEFS_TOKEN": TOKEN}
    assert len(_json_lines(cli("status", "--json", "--endpoint", endpoint, env=trusted))) == 1
    from_file = {"CACHEFS_TLS_CA": str(cert), "CACHEFS_TOKEN_FILE": str(token_file)}
    assert _json_lines(cli("status", "--json", "--endpoint", endpoint, env=from_file))

    plaintext = cli("status", "--endpoint", endpoint, env={"CACHEFS_TOKEN": TOKEN})
    assert "CACHEFS_TLS_CA" in _error_line(plaintext)
    untrusted = {"CACHEFS_TLS_CA": str(other), "CACHEFS_TOKEN": TOKEN}
    refused = cli("status", "--endpoint", endpoint, env=untrusted)
    assert refused.returncode == 1 and endpoint in _error_line(refused), refused
    wrong_token = {"CACHEFS_TLS_CA": str(cert), "CACHEFS_TOKEN": TOKEN + "x"}
    assert "CACHEFS_TOKEN" in _error_line(cli("status", "--endpoint", endpoint, env=wrong_token))


@pytest.mark.exercises("--publish-timeout")
@pytest.mark.parametrize("seconds", ["0", "111"])
def test_a_publish_timeout_kubelet_would_not_wait_for_is_refused(
    tmp_path: Path, cli: Cli, seconds: str
) -> None:
    """The flag is held to the config key's range: kubelet gives up after 120 s."""
    result = cli(
        "csi",
        "--publish-timeout",
        seconds,
        "--node-id",
        "node-a",
        "--csi-endpoint",
        f"unix://{tmp_path}/csi.sock",
        "--state-dir",
        str(tmp_path / "state"),
    )
    error = _error_line(result)
    assert "--publish-timeout must be between 1 and 110 seconds" in error, error
    assert not (tmp_path / "csi.sock").exists()
