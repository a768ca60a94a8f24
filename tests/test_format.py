"""The cache format on disk: a root of another format is refused, never rewritten;
objects cut with another block size are served as they are."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import fsspec
import yaml
from daemon import run_cli

BLOCK = 64 * 1024


def _cli(tmp_path: Path, s3, *args: str, block_size: int = BLOCK) -> subprocess.CompletedProcess:
    config = tmp_path / "cachefs.yaml"
    config.write_text(
        yaml.safe_dump({"cache_dir": str(tmp_path / "cache"), "block_size": block_size})
    )
    return run_cli("--config", str(config), *args, env=s3.env())


def _ls(tmp_path: Path, s3, block_size: int = BLOCK) -> dict[str, dict]:
    result = _cli(tmp_path, s3, "ls", "--json", block_size=block_size)
    assert result.returncode == 0, result.stderr
    return {row["url"]: row for row in map(json.loads, result.stdout.splitlines())}


def test_a_new_root_is_marked_with_its_format(tmp_path, s3) -> None:
    assert _cli(tmp_path, s3, "status").returncode == 0
    assert json.loads((tmp_path / "cache" / "FORMAT").read_text()) == {"format": 1}


def test_a_root_of_another_format_is_refused_and_left_alone(tmp_path, s3, start_node) -> None:
    root = tmp_path / "cache"
    (root / "v2" / "objects").mkdir(parents=True)
    (root / "FORMAT").write_text('{"format": 2}\n')
    before = sorted(p.relative_to(root) for p in root.rglob("*"))

    result = _cli(tmp_path, s3, "ls")
    assert result.returncode == 1
    assert f"cache directory {root} holds cache format 2" in result.stderr
    assert "this cachefs reads format 1" in result.stderr
    assert "point the tier at another directory" in result.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written

    node = start_node(root, ready=False)
    assert node.wait_exit() == 1
    assert any("holds cache format 2" in line for line in node.lines)


def test_a_root_without_the_file_but_with_a_newer_directory_is_refused(tmp_path, s3) -> None:
    root = tmp_path / "cache"
    (root / "v3").mkdir(parents=True)
    result = _cli(tmp_path, s3, "status")
    assert result.returncode == 1 and "holds cache format 3" in result.stderr


def test_a_root_from_before_the_format_file_is_format_1(tmp_path, s3) -> None:
    s3.put("m/a.bin", os.urandom(3 * BLOCK))
    assert _cli(tmp_path, s3, "prefetch", s3.url("m/a.bin")).returncode == 0
    (tmp_path / "cache" / "FORMAT").unlink()  # as an older cachefs left it
    assert _ls(tmp_path, s3)[s3.url("m/a.bin")]["complete"]
    assert (tmp_path / "cache" / "FORMAT").exists()


def test_objects_of_another_block_size_are_served_new_ones_use_the_new_size(tmp_path, s3) -> None:
    old, new = os.urandom(5 * BLOCK + 7), os.urandom(5 * BLOCK + 7)
    s3.put("m/old.bin", old)
    s3.put("m/new.bin", new)
    assert _cli(tmp_path, s3, "prefetch", s3.url("m/old.bin")).returncode == 0
    s3.reset_requests()

    bigger = 4 * BLOCK
    result = _cli(
        tmp_path, s3, "prefetch", s3.url("m/old.bin"), s3.url("m/new.bin"), block_size=bigger
    )
    assert result.returncode == 0, result.stderr
    assert s3.gets("m/old.bin") == []  # served as cut before: nothing fetched again
    assert sorted(s3.gets("m/new.bin")) == [(0, bigger - 1), (bigger, len(new) - 1)]
    rows = _ls(tmp_path, s3, block_size=bigger)
    assert rows[s3.url("m/old.bin")]["complete"] and rows[s3.url("m/new.bin")]["complete"]

    config = tmp_path / "cachefs.yaml"  # as the last command left it: the bigger blocks
    for key, data in (("m/old.bin", old), ("m/new.bin", new)):
        with fsspec.open(f"cachefs::{s3.url(key)}", cachefs={"config": str(config)}) as f:
            assert f.read() == data
    assert s3.gets("m/old.bin") == []
