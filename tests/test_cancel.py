"""Cancelling a prefetch job: `cachefs cancel JOB_ID` and the Cancel RPC.

A cancelled job starts no new fetch, releases the pins it added and keeps every block
it completed; only whoever started it (or may manage its sources) may cancel it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import run_cli
from servers import NOBODY_GID, wait_for

from cachefs.client import NodeClient
from cachefs.errors import JobCancelledError

BLOCK = 64 * 1024
BLOCKS = 12
NOBODY_UID = 65534


def _cli(node: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"CACHEFS_ENDPOINT": node.unix_endpoint})


def _node(start_node: Any, tmp_path: Path, *, concurrency: int = 2, **extra: Any) -> Any:
    config = {
        "cache_dir": str(tmp_path / "cache"),
        "block_size": BLOCK,
        "concurrency": concurrency,
        **extra,
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_node(tmp_path / "cache", config=path)


def _entry(node: Any, url: str) -> dict[str, Any] | None:
    result = _cli(node, "ls", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return next((row for row in rows if row.get("url") == url), None)


def test_cancel_stops_fetching_releases_pins_and_keeps_blocks(start_node, tmp_path, s3) -> None:
    data = os.urandom(BLOCK * BLOCKS)
    s3.put("m/big.bin", data)
    url = s3.url("m/big.bin")
    node = _node(start_node, tmp_path)
    # Blocks 0-1 come through; every later GET waits at the gate.
    with s3.hold_gets("m/big.bin", min_start=2 * BLOCK) as gate:
        started = _cli(node, "prefetch", "--detach", "--pin", "--holder", "user:t", url)
        assert started.returncode == 0, started.stderr
        job_id = started.stdout.strip()
        gate.wait_held(2)  # concurrency 2: two GETs in flight, the rest queued
        wait_for(lambda: (_entry(node, url) or {}).get("cached_bytes") == 2 * BLOCK, 30)
        gets_at_cancel = len(s3.gets("m/big.bin"))

        cancelled = _cli(node, "cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        # The blocks in flight are held at the gate: the job says it stops once they end.
        assert f"job {job_id}" in cancelled.stdout
        gate.release()

    status = json.loads(_cli(node, "status", "--json").stdout)
    job = next(j for j in status["jobs"] if j["id"] == job_id)
    wait_for(
        lambda: (
            next(
                j
                for j in json.loads(_cli(node, "status", "--json").stdout)["jobs"]
                if j["id"] == job_id
            )["state"]
            == "cancelled"
        ),
        30,
    )
    # The two GETs in flight land and stay cached; none was started after the cancel.
    wait_for(lambda: (_entry(node, url) or {}).get("cached_bytes") == gets_at_cancel * BLOCK, 30)
    assert len(s3.gets("m/big.bin")) == gets_at_cancel < BLOCKS
    entry = _entry(node, url)
    assert entry is not None and not entry["complete"]
    assert entry["pinned_by"] == [], entry  # the job's pin is released
    assert job["sources"] == [url]

    # What was kept is the origin's bytes: a read completes the object from there.
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    info = client.stat(url)
    assert client.read(info, 0, len(data)) == data
    client.close()


def test_a_watcher_of_a_cancelled_job_gets_job_cancelled_error(start_node, tmp_path, s3) -> None:
    s3.put("m/w.bin", os.urandom(BLOCK * 4))
    url = s3.url("m/w.bin")
    node = _node(start_node, tmp_path, concurrency=1)
    client = NodeClient(node.unix_endpoint, token="", tls_ca="")
    with s3.hold_gets("m/w.bin") as gate:
        started = client.prefetch([url], detach=True)
        gate.wait_held(1)
        status = client.cancel(started.id)
        assert status.id == started.id
    with pytest.raises(JobCancelledError, match="cancelled"):
        client.wait(started.id)
    again = client.cancel(started.id)  # a finished job: nothing changes, no error
    assert again.state == "cancelled"
    client.close()


def test_only_the_starter_or_a_manager_may_cancel(start_node, tmp_path, s3, run_as_nobody) -> None:
    s3.put("m/p.bin", os.urandom(BLOCK * 4))
    url = s3.url("m/p.bin")
    node = _node(
        start_node,
        tmp_path,
        concurrency=1,
        server={"socket_group": str(NOBODY_GID)},
        policy=[
            {"callers": ["uid:0"], "allow": ["all"]},
            {"callers": [f"uid:{NOBODY_UID}"], "allow": ["read", "prefetch"]},
        ],
    )
    with s3.hold_gets("m/p.bin") as gate:
        started = _cli(node, "prefetch", "--detach", url)
        assert started.returncode == 0, started.stderr
        job_id = started.stdout.strip()
        gate.wait_held(1)
        refused = run_as_nobody(
            [*run_as_nobody.python, "-m", "cachefs.cli", "cancel", job_id],
            env={"CACHEFS_ENDPOINT": node.unix_endpoint},
        )
        assert refused.returncode != 0
        assert f"job {job_id} was started by uid:0" in refused.stderr, refused.stderr
        assert "manage" in refused.stderr
        cancelled = _cli(node, "cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr


def test_cancel_of_an_unknown_job_says_so(start_node, tmp_path) -> None:
    node = _node(start_node, tmp_path)
    result = _cli(node, "cancel", "0123456789abcdef")
    assert result.returncode == 1
    assert "no job '0123456789abcdef' on this node" in result.stderr
