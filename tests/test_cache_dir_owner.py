"""One owner per cache directory: a node alone, or processes in embedded mode.

An embedded prefetch into a node's directory would write objects the node neither
lists nor evicts; a node started on a directory that embedded processes use would do
the same to them. Whoever comes second is refused with the owner named, and an
embedded process is told the node's endpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon import run_cli

from cachefs.client import NodeClient

# A process in embedded mode that keeps its cache open until its stdin closes.
_EMBEDDED = (
    "import sys\n"
    "from cachefs.connect import connect\n"
    "client = connect(None, sys.argv[1])\n"
    "print(client.status().tiers[0].path, flush=True)\n"
    "sys.stdin.read()\n"
)


def _objects(cache: Path) -> list[Path]:
    return sorted((cache / "v1" / "objects").glob("*/*/meta"))


def test_an_embedded_command_on_a_node_directory_is_sent_to_the_node(
    start_node, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    node = start_node(cache)
    origin = tmp_path / "weights.bin"
    origin.write_bytes(b"w" * 4096)

    refused = run_cli("prefetch", f"file://{origin}", env={"CACHEFS_CACHE_DIR": str(cache)})
    assert refused.returncode == 1, refused
    line = refused.stderr.strip()
    assert line.startswith("cachefs: error: cache directory"), line
    assert f"--endpoint {node.unix_endpoint}" in line, line
    assert f"CACHEFS_ENDPOINT={node.unix_endpoint}" in line, line
    assert _objects(cache) == []  # nothing written behind the node's back

    # The command the message names works, and the node lists what it fetched.
    sent = run_cli("prefetch", "--endpoint", node.unix_endpoint, f"file://{origin}")
    assert sent.returncode == 0, sent.stderr
    assert [e.url for e in NodeClient(node.unix_endpoint).cached()] == [f"file://{origin}"]


def test_a_node_refuses_a_directory_that_embedded_processes_use(start_node, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", _EMBEDDED, str(cache)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)  # two embedded processes share a directory
    ]
    try:
        for holder in holders:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == str(cache)
        node = start_node(cache, ready=False)
        assert node.wait_exit(timeout=60) == 1  # its log is read to the end by then
        error = node.lines[-1]
        assert error.startswith("cachefs: error: cache directory"), node.lines
        assert "in use by cachefs in embedded mode" in error and "--cache-dir" in error, error
        # A node that never served has nothing to drain: the error is all it says.
        assert not any("draining" in line or "stopped" in line for line in node.lines)
    finally:
        for holder in holders:
            holder.communicate("", timeout=30)
    # Once they are gone, the node takes the directory.
    assert start_node(cache).process.poll() is None
