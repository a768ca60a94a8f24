"""What a new user trips over first, seen from the ``cachefs`` command: missing extras,
bad numbers in the config, a closed pipe, a typo in a group name, the cluster's members."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import NodeProcess, loopback_addresses
from helpers import interrupt_when_held
from servers import RangeHTTPServer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The child's environment: no inherited CACHEFS_ settings, the cache under the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env.update(PYTHONPATH=str(REPO_ROOT), CACHEFS_CACHE_DIR=str(cache_dir))
    env.update(extra)
    return env


def _run(
    tmp_path: Path, *args: str, argv: list[str] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv or [sys.executable, "-m", "cachefs.cli", *args],
        env=_env(tmp_path / "cache", **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


_CLI = (sys.executable, "-m", "cachefs.cli")


def _error(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``cachefs: error:`` line of a command that exited 1."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachefs: error: "), result.stderr
    return lines[0]


# Runs the CLI as a user without the module installed would: its import fails.
_WITHOUT = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from cachefs.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


@pytest.mark.parametrize(
    ("url", "blocked", "module", "extra"),
    [
        ("gs://bucket/x", "gcsfs", "gcsfs", "gcs"),
        ("gcs://bucket/x", "gcsfs", "gcsfs", "gcs"),
        ("az://container/x", "adlfs", "adlfs", "azure"),
        ("abfs://container/x", "adlfs", "adlfs", "azure"),
    ],
)
def test_missing_backend_names_the_module_and_the_extra(
    tmp_path: Path, url: str, blocked: str, module: str, extra: str
) -> None:
    """A backend whose package is missing names that package and the extra to install,
    never "None is missing" or an extra that does not exist."""
    argv = [sys.executable, "-c", _WITHOUT, blocked, "prefetch", url]
    line = _error(_run(tmp_path, argv=argv))
    assert f"({module} is missing)" in line, line
    assert f"pip install 'cachefs[{extra}]'" in line, line
    assert "None" not in line, line


@pytest.mark.parametrize(
    ("variable", "value", "fragments"),
    [
        (
            "CACHEFS_CONCURRENCY",
            "abc",
            ["concurrency must be a whole number between 1 and 256, not 'abc'"],
        ),
        ("CACHEFS_CONCURRENCY", "0", ["concurrency must be between 1 and 256, not 0"]),
        ("CACHEFS_RETRY__ATTEMPTS", "0", ["retry.attempts must be at least 1, not 0"]),
        ("CACHEFS_RETRY__ATTEMPTS", "many", ["retry.attempts must be a whole number", "'many'"]),
        ("CACHEFS_RETRY__TIMEOUT", "slow", ["retry.timeout must be a number", "'slow'"]),
        ("CACHEFS_RETRY__BASE_DELAY", "-1", ["retry.base_delay must be at least 0, not -1"]),
        ("CACHEFS_ORIGIN_CONNECTIONS", "2.5", ["origin_connections must be a whole number"]),
        ("CACHEFS_ORIGIN_CONNECTIONS", "9999", ["origin_connections must be between 1 and 4096"]),
        ("CACHEFS_REVALIDATE_AFTER", "soon", ["revalidate_after must be a number", "'soon'"]),
        ("CACHEFS_READAHEAD_BLOCKS", "-2", ["readahead_blocks must be at least 0, not -2"]),
        ("CACHEFS_BLOCK_SIZE", "-1GiB", ["block_size must be a size of 0 or more", "'-1GiB'"]),
        ("CACHEFS_BLOCK_SIZE", "huge", ["block_size is not a size: 'huge'", "8MiB"]),
        ("CACHEFS_BLOCK_SIZE", "5000", ["block_size must be a multiple of 4 KiB"]),
        ("CACHEFS_SCRUB__PAUSE", "later", ["scrub.pause", "'later'"]),
        ("CACHEFS_SCRUB__RATE", "fast", ["scrub.rate", "'fast'"]),
        ("CACHEFS_SERVER__WORKERS", "lots", ["server.workers must be a whole number", "'lots'"]),
        ("CACHEFS_CLUSTER__DNS_PORT", "70000", ["cluster.dns_port must be between 1 and 65535"]),
    ],
)
def test_bad_numbers_name_the_key_and_the_variable(
    tmp_path: Path, variable: str, value: str, fragments: list[str]
) -> None:
    """Each numeric key is checked when the config is read; the one-line error says
    what is wrong and names the key and the environment variable that set it."""
    line = _error(_run(tmp_path, "status", **{variable: value}))
    for fragment in [*fragments, f"({variable})"]:
        assert fragment in line, (fragment, line)
    assert "invalid literal" not in line and "could not convert" not in line, line


def test_negative_tier_quota_names_the_tier_key(tmp_path: Path) -> None:
    """A negative quota is called negative, with the tier's key and where it is set."""
    config = tmp_path / "cachefs.yaml"
    config.write_text(f"tiers:\n  - name: disk\n    path: {tmp_path / 'tier'}\n    quota: -1GiB\n")
    line = _error(_run(tmp_path, "status", CACHEFS_CONFIG=str(config)))
    assert "tiers[0].quota must be a size of 0 or more" in line, line
    assert "'-1GiB'" in line and "(CACHEFS_TIERS)" in line, line


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """``cachefs status | head -1``: the reader closing the pipe is no error to report."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cachefs.cli", "status"],
        env=_env(tmp_path / "cache"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes a byte
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=60)
    assert code in (0, 141), (code, stderr)
    assert stderr == "", stderr


def test_unknown_socket_group_names_the_key(tmp_path: Path) -> None:
    """A socket group that does not exist stops the node with the key to fix."""
    line = _error(
        _run(
            tmp_path,
            "node",
            "--socket",
            str(tmp_path / "node.sock"),
            CACHEFS_SERVER__SOCKET_GROUP="no-such-group-cachefs",
        )
    )
    assert "server.socket_group 'no-such-group-cachefs' is not a group of this host" in line
    assert "CACHEFS_SERVER__SOCKET_GROUP" in line, line
    assert not (tmp_path / "node.sock").exists()


def test_status_lists_the_cluster_members(
    tmp_path: Path, start_node: Callable[..., NodeProcess]
) -> None:
    """``cachefs status`` shows the members the node sees, as docs/cluster.md says."""
    addresses = loopback_addresses(2)
    node = start_node(
        tcp=addresses[0], extra_args=("--peers", ",".join(addresses), "--node-id", "one")
    )
    result = _run(tmp_path, "--endpoint", node.unix_endpoint, "status")
    assert result.returncode == 0, result.stderr
    members = [line for line in result.stdout.splitlines() if line.startswith("cluster ")]
    assert len(members) == 1, result.stdout
    for address in addresses:
        assert address in members[0], members[0]


@pytest.mark.exercises("--wait")
def test_prefetch_wait_returns_when_the_objects_are_cached(tmp_path: Path) -> None:
    """``--wait`` (the default, spelled out) returns once every object is complete."""
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(100 * 1024))
    url = model.as_uri()
    result = _run(tmp_path, "prefetch", "--wait", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("prefetched 1 "), result.stdout
    listing = _run(tmp_path, "ls", url)
    assert listing.returncode == 0, listing.stderr
    assert "complete" in listing.stdout, listing.stdout


def test_ctrl_c_of_a_prefetch_through_a_node_cancels_its_job(
    tmp_path: Path, start_node: Callable[..., NodeProcess], http_origin: RangeHTTPServer
) -> None:
    """Ctrl-C while a prefetch waits on a node stops the node's job too, and says so:
    the job must not go on fetching unseen."""
    http_origin.put("/big.bin", os.urandom(256 * 1024))
    node = start_node()
    with http_origin.hold_gets("/big.bin") as gate:
        argv = [*_CLI, "--endpoint", node.unix_endpoint, "prefetch", http_origin.url("/big.bin")]
        code, out, err = interrupt_when_held(argv, _env(tmp_path / "unused"), gate)
    assert code == 130, (out, err)
    lines = err.strip().splitlines()
    assert lines[-2] == "cachefs: interrupted", err
    job_id = re.fullmatch(r"cachefs: job (\S+) on the node was cancelled; .*", lines[-1])
    assert job_id, err
    status = json.loads(_run(tmp_path, "--endpoint", node.unix_endpoint, "--json", "status").stdout)
    assert {j["id"]: j["state"] for j in status["jobs"]}[job_id.group(1)] == "cancelled"


def test_ls_has_a_version_column_and_old_versions_are_marked(tmp_path: Path) -> None:
    """Two versions of one URL are told apart, and the one the origin replaced says it
    goes first."""
    model = tmp_path / "model.bin"
    model.write_bytes(b"a" * 5000)
    os.utime(model, (1_000_000_000, 1_000_000_000))
    assert _run(tmp_path, "prefetch", model.as_uri()).returncode == 0
    model.write_bytes(b"b" * 6000)
    assert _run(tmp_path, "prefetch", model.as_uri()).returncode == 0

    entries = [json.loads(line) for line in _run(tmp_path, "ls", "--json").stdout.splitlines()]
    assert [(e["size"], e["superseded"]) for e in entries] == [(6000, False), (5000, True)]
    lines = _run(tmp_path, "ls").stdout.splitlines()
    assert len(lines) == 2
    columns = [line.split("  ") for line in lines]
    assert [c[0] for c in columns] == [model.as_uri()] * 2, lines
    versions = [e["version"] for e in entries]
    assert versions[0] != versions[1]
    for column, version in zip(columns, versions, strict=True):  # start and end shown
        assert column[1] == f"{version[:12]}…{version[-8:]}", (column, version)
    assert "superseded (evicted first)" in lines[1] and "superseded" not in lines[0]


def test_evict_and_unpin_twice_both_succeed(tmp_path: Path) -> None:
    """The second evict or unpin of the same thing has nothing to do, and succeeds."""
    model = tmp_path / "model.bin"
    model.write_bytes(b"m" * 3000)
    url = model.as_uri()
    assert _run(tmp_path, "prefetch", "--pin", "--holder", "job:x", url).returncode == 0
    first, second = (_run(tmp_path, "unpin", "--holder", "job:x", url) for _ in range(2))
    assert (first.returncode, first.stdout) == (0, "released 1 pin of job:x\n")
    assert (second.returncode, second.stdout) == (
        0,
        "released 0 pins of job:x (it holds none of these)\n",
    )
    first, second = (_run(tmp_path, "evict", url) for _ in range(2))
    assert (first.returncode, first.stdout) == (0, "evicted 1 object\n")
    assert (second.returncode, second.stdout) == (0, "evicted 0 objects (nothing cached matches)\n")


def test_embedded_status_says_its_counters_are_per_process(tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"m" * 3000)
    assert _run(tmp_path, "prefetch", model.as_uri()).returncode == 0
    last = _run(tmp_path, "status").stdout.splitlines()[-1]
    assert last.startswith("served ") and "embedded mode counts per process" in last, last


def test_csi_help_shows_the_defaults_the_plugin_uses(tmp_path: Path) -> None:
    from cachefs.csi.plugin import DEFAULT_CSI_ENDPOINT, DEFAULT_NODE_ENDPOINT
    from cachefs.node.config import CsiConfig

    text = " ".join(_run(tmp_path, "csi", "--help").stdout.split())
    for default in (
        DEFAULT_CSI_ENDPOINT,
        DEFAULT_NODE_ENDPOINT,
        CsiConfig.state_dir,
        f"default {CsiConfig.publish_timeout:g})",
        "NODE_NAME",
    ):
        assert default in text, (default, text)


def test_a_node_refused_for_lacking_a_token_says_only_why(tmp_path: Path) -> None:
    """A node that never served logs no drain: its one line is the reason."""
    result = _run(
        tmp_path, "node", "--socket", str(tmp_path / "n.sock"), "--address", "127.0.0.1:0"
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert "must present a shared token" in result.stderr
    assert "draining" not in result.stderr and "stopped" not in result.stderr
