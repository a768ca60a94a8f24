"""Crash safety: SIGKILL a prefetching ``cachefs`` process anywhere, then restart.

The prefetch runs as ``python -m cachefs.cli prefetch --json`` in its own process
group and dies at a named crash point (``CACHEFS_TEST_CRASH_AT``) or at a seeded
random moment of its progress. A fresh process on the same cache directory must
then serve only origin bytes, fetch exactly the blocks the crashed run had not
recorded, empty the trash and count no leftover as an object.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import xxhash
from servers import RangeHTTPServer, wait_for

from cachefs.node.config import load_config
from cachefs.node.engine import Engine

REPO_ROOT = Path(__file__).resolve().parents[1]
KIB = 1024
CHILD_TIMEOUT = 60
_OBJECT_ID = re.compile(r"[0-9a-f]{32}")
_BLOCK_LINE = re.compile(rb"b (\d+) ([0-9a-f]{16})")


@dataclass
class MetaState:
    """What an object's meta file on disk vouches for, parsed independently of the store."""

    directory: Path
    url: str
    size: int
    block_size: int
    blocks: dict[int, int]
    torn_tail: bytes

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_size)


def read_metas(root: Path) -> dict[str, MetaState]:
    """Every object directory's meta under ``root``: complete block lines only."""
    states: dict[str, MetaState] = {}
    for meta in sorted((root / "v1" / "objects").glob("*/*/meta")):
        if meta.parent.name.startswith(".new-"):
            continue  # a staging directory: not an object yet
        raw = meta.read_bytes()
        first, newline, rest = raw.partition(b"\n")
        if not newline:
            continue
        header = json.loads(first)
        lines = rest.split(b"\n")
        blocks: dict[int, int] = {}
        for line in lines[:-1]:
            match = _BLOCK_LINE.fullmatch(line)
            if match:
                blocks[int(match[1])] = int(match[2], 16)
        states[header["id"]] = MetaState(
            meta.parent, header["url"], header["size"], header["block_size"], blocks, lines[-1]
        )
    return states


def origin_path(url: str) -> str:
    return unquote(urlsplit(url).path)


def block_of(data: bytes, block_size: int, index: int) -> bytes:
    return data[index * block_size : (index + 1) * block_size]


def check_recorded_blocks(states: Mapping[str, MetaState], files: Mapping[str, bytes]) -> None:
    """Every block a meta file records has the origin's checksum and bytes on disk."""
    for state in states.values():
        data = files[origin_path(state.url)]
        assert state.size == len(data)
        assert (state.directory / "data").stat().st_size == state.size
        with open(state.directory / "data", "rb") as fh:
            for index, checksum in state.blocks.items():
                expected = block_of(data, state.block_size, index)
                assert checksum == xxhash.xxh3_64_intdigest(expected), (state.url, index)
                fh.seek(index * state.block_size)
                assert fh.read(len(expected)) == expected, (state.url, index)


def child_env(block_size: str, crash_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env["CACHEFS_BLOCK_SIZE"] = block_size
    if crash_at:
        env["CACHEFS_TEST_CRASH_AT"] = crash_at
    return env


def start_prefetch(args: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    """``cachefs prefetch --json`` in a new session, so its whole group can be killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "cachefs.cli", *args, "--json"],
        cwd=REPO_ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=CHILD_TIMEOUT)


def run_until_crash(args: list[str], env: Mapping[str, str]) -> None:
    """Run a prefetch that must kill itself at its crash point."""
    proc = start_prefetch(args, env)
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, f"no crash: rc={proc.returncode} {out} {err}"
    assert '"event": "done"' not in out


def make_engine(root: Path, block_size: str, quota: str | None = None) -> Engine:
    tier: dict[str, object] = {"name": "disk", "path": str(root)}
    if quota:
        tier["quota"] = quota
    overrides = {"tiers": [tier], "block_size": block_size}
    return Engine(load_config(overrides=overrides, environ={}))


def fetched_blocks(
    origin: RangeHTTPServer, files: Mapping[str, bytes], block_size: int
) -> list[tuple[str, int]]:
    """(path, block index) of every object GET the origin saw, checking block alignment."""
    seen = []
    for path, data in files.items():
        for byte_range in origin.gets(path):
            assert byte_range is not None, f"full GET of {path}"
            start, end = byte_range
            assert start % block_size == 0, (path, byte_range)
            assert end == min(start + block_size, len(data)) - 1, (path, byte_range)
            seen.append((path, start // block_size))
    return seen


def check_clean_restart(root: Path, engine: Engine, files: Mapping[str, bytes]) -> None:
    """The trash is empty and the store counts exactly one real object per origin file."""
    assert list((root / "v1" / "trash").iterdir()) == []
    objects = engine.store.objects()
    assert sorted(origin_path(o.header.url) for o in objects) == sorted(files)
    for obj in objects:
        assert _OBJECT_ID.fullmatch(obj.directory.name)
        assert obj.data_path.is_file() and obj.meta_path.is_file()
        assert obj.directory.parent.parent == root / "v1" / "objects"


def restart_and_check(
    origin: RangeHTTPServer,
    root: Path,
    files: Mapping[str, bytes],
    block_size: int,
    source: str,
    quota: str | None = None,
) -> None:
    """After a crash: a new engine fetches exactly the unrecorded blocks and reads true bytes.

    A third engine then fetches nothing: every block the second one recorded survives.
    """
    states = read_metas(root)
    check_recorded_blocks(states, files)
    recorded = {(origin_path(s.url), i) for s in states.values() for i in s.blocks}
    everything = {
        (path, i) for path, data in files.items() for i in range(-(-len(data) // block_size))
    }
    origin.reset_requests()
    engine = make_engine(root, f"{block_size // KIB}KiB", quota)
    try:
        assert list((root / "v1" / "trash").iterdir()) == []
        result = engine.prefetch([source])
        missing = everything - recorded
        # The origin may also log GETs the killed process sent just before it died:
        # those are of unrecorded blocks too, so the set is exact; the count is the
        # new engine's own.
        assert set(fetched_blocks(origin, files, block_size)) == missing
        assert engine.stats.snapshot()["origin_requests"].get("read", 0) == len(missing)
        assert result.fetched_bytes == sum(
            len(block_of(files[p], block_size, i)) for p, i in missing
        )
        assert result.cached_before == sum(
            len(block_of(files[path], block_size, i)) for path, i in recorded
        )
        for path, data in files.items():
            assert engine.read(origin.url(path)) == data
        check_clean_restart(root, engine, files)
    finally:
        engine.close()
    origin.reset_requests()
    engine = make_engine(root, f"{block_size // KIB}KiB", quota)
    try:
        assert engine.prefetch([source]).fetched_bytes == 0
        assert engine.stats.snapshot()["origin_requests"].get("read", 0) == 0
        assert set(fetched_blocks(origin, files, block_size)) <= missing  # late, if any
        for path, data in files.items():
            assert engine.read(origin.url(path)) == data
        check_clean_restart(root, engine, files)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "point, hit",
    [
        ("after-data-write", 1),
        ("after-data-write", 7),
        ("before-checksum-record", 4),
        ("torn-checksum-record", 1),
        ("torn-checksum-record", 5),
    ],
)
def test_crash_point_in_block_write(
    http_origin: RangeHTTPServer, cache_dir: Path, point: str, hit: int
) -> None:
    """A kill between a block's bytes and its record loses that block only, never trust.

    Blocks of one object are written in parallel, but a record follows its own
    block's write, so the N-th hit finds at most N - 1 blocks recorded, each with the
    origin's bytes; a torn record is ignored and does not swallow the record
    appended after it.
    """
    block_size = 64 * KIB
    data = random.Random(hit).randbytes(20 * block_size + 1234)
    files = {"/w/model.bin": data}
    http_origin.put("/w/model.bin", data)
    url = http_origin.url("/w/model.bin")
    env = child_env("64KiB", f"{point}:{hit}")
    run_until_crash(["--cache-dir", str(cache_dir), "prefetch", url], env)

    (state,) = read_metas(cache_dir).values()
    assert len(state.blocks) <= hit - 1
    if point == "torn-checksum-record":
        assert state.torn_tail.startswith(b"b "), "the crash left no torn record"
    else:
        assert state.torn_tail == b""
    restart_and_check(http_origin, cache_dir, files, block_size, url)


@pytest.mark.parametrize("hit", [1, 3])
def test_crash_mid_eviction(http_origin: RangeHTTPServer, tmp_path: Path, hit: int) -> None:
    """A kill after an evicted object left the index but before its files were removed.

    The retired directory waits in the trash; the next start empties it and the
    evicted object's blocks count as missing.
    """
    block_size = 64 * KIB
    rng = random.Random(hit)
    files = {f"/e/shard-{i}.bin": rng.randbytes(8 * block_size + 100 * i) for i in range(4)}
    for path, data in files.items():
        http_origin.put(path, data)
    root = tmp_path / "cache"
    config = tmp_path / "cachefs.yaml"
    config.write_text(
        f"block_size: 64KiB\ntiers:\n  - name: disk\n    path: {root}\n    quota: 1MiB\n"
    )
    source = http_origin.url("/e/")
    env = child_env("64KiB", f"mid-eviction:{hit}")
    run_until_crash(["--config", str(config), "prefetch", source], env)

    assert list((root / "v1" / "trash").iterdir()), "the crash left nothing in the trash"
    restart_and_check(http_origin, root, files, block_size, source, quota="64MiB")


def test_crash_mid_repair(http_origin: RangeHTTPServer, cache_dir: Path) -> None:
    """A kill after a corrupt block was found but before the meta was rewritten.

    The record still vouches for the bad bytes, so the next process finds them bad
    again, serves origin bytes and refetches that block only.
    """
    block_size = 64 * KIB
    data = random.Random(7).randbytes(6 * block_size + 99)
    http_origin.put("/r/model.bin", data)
    url = http_origin.url("/r/model.bin")
    engine = make_engine(cache_dir, "64KiB")
    try:
        engine.prefetch([url])
    finally:
        engine.close()
    (state,) = read_metas(cache_dir).values()
    with open(state.directory / "data", "r+b") as fh:
        fh.seek(2 * block_size + 10)
        fh.write(bytes([data[2 * block_size + 10] ^ 0xFF]))

    code = (
        "import sys\n"
        "from cachefs.node.embedded import get_service\n"
        "get_service(sys.argv[1]).engine.read(sys.argv[2])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cache_dir), url],
        cwd=REPO_ROOT,
        env=child_env("64KiB", "mid-repair:1"),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (state,) = read_metas(cache_dir).values()
    assert 2 in state.blocks, "the crash came after the repair was recorded"

    http_origin.reset_requests()
    engine = make_engine(cache_dir, "64KiB")
    try:
        assert engine.read(url) == data
        assert http_origin.gets("/r/model.bin") == [(2 * block_size, 3 * block_size - 1)]
        check_clean_restart(cache_dir, engine, {"/r/model.bin": data})
    finally:
        engine.close()
    (state,) = read_metas(cache_dir).values()
    assert len(state.blocks) == state.block_count
    check_recorded_blocks(read_metas(cache_dir), {"/r/model.bin": data})


def test_leftovers_of_a_crash_are_not_objects(
    http_origin: RangeHTTPServer, cache_dir: Path
) -> None:
    """Staging directories, temporary meta files and strays are never counted as objects.

    Fresh leftovers may belong to a live process and stay; stale ones (over an hour
    old) are removed; whatever start retires leaves nothing in the trash.
    """
    block_size = 64 * KIB
    data = random.Random(5).randbytes(10 * block_size + 5)
    files = {"/s/model.bin": data}
    http_origin.put("/s/model.bin", data)
    url = http_origin.url("/s/model.bin")
    run_until_crash(
        ["--cache-dir", str(cache_dir), "prefetch", url],
        child_env("64KiB", "after-data-write:4"),
    )
    (state,) = read_metas(cache_dir).values()
    shard = state.directory.parent
    hour_ago = time.time() - 7200
    leftovers = {}
    for name, stale in [("fresh", False), ("stale", True)]:
        staging = shard / f".new-{state.directory.name}-{name:0>8}"
        staging.mkdir()
        shutil.copy(state.directory / "data", staging / "data")
        shutil.copy(state.directory / "meta", staging / "meta")
        temporary = state.directory / f"meta.4242-{name:0>8}.tmp"
        temporary.write_bytes(b"half a meta file")
        if stale:
            for path in (staging / "data", staging / "meta", staging, temporary):
                os.utime(path, (hour_ago, hour_ago))
        leftovers[name] = (staging, temporary)
    stray = cache_dir / "v1" / "objects" / "ab" / "stray"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"not an object")

    engine = make_engine(cache_dir, "64KiB")
    try:
        check_clean_restart(cache_dir, engine, files)
        assert all(p.exists() for p in leftovers["fresh"])
        assert not any(p.exists() for p in leftovers["stale"])
        assert not stray.exists()
        assert engine.read(url) == data
        assert len(engine.store.objects()) == 1
    finally:
        engine.close()


class LineReader:
    """Collects a child's stdout lines in a thread, so the test can poll them."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self._thread.start()

    def _run(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(json.loads(line))

    def join(self) -> None:
        self._thread.join(timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("seed", [0, 5, 10])
def test_sigkill_at_random_progress(
    http_origin: RangeHTTPServer, cache_dir: Path, seed: int
) -> None:
    """SIGKILL the prefetch's process group once its progress passes a seeded byte count.

    The last object is held at the origin so the prefetch cannot finish; the test
    kills at the first progress line at or past the chosen count, or, if the last
    line came before it, once everything else is recorded.
    """
    rng = random.Random(seed)
    block_size = 16 * KIB
    files = {
        f"/m/shard-{i}.bin": rng.randbytes(
            rng.randrange(60, 160) * block_size + rng.randrange(1, 999)
        )
        for i in range(3)
    }
    files["/m/zz-tail.bin"] = rng.randbytes(block_size)
    for path, data in files.items():
        http_origin.put(path, data)
    body_bytes = sum(len(d) for p, d in files.items() if p != "/m/zz-tail.bin")
    body_blocks = sum(-(-len(d) // block_size) for p, d in files.items() if p != "/m/zz-tail.bin")
    kill_at = rng.randrange(1, body_bytes)
    source = http_origin.url("/m/")

    def body_recorded() -> int:
        return sum(
            len(s.blocks)
            for s in read_metas(cache_dir).values()
            if not s.url.endswith("/zz-tail.bin")
        )

    with http_origin.hold_gets("/m/zz-tail.bin") as gate:
        proc = start_prefetch(
            ["--cache-dir", str(cache_dir), "prefetch", source], child_env("16KiB")
        )
        reader = LineReader(proc)
        try:

            def time_to_kill() -> bool:
                assert proc.poll() is None, "the prefetch exited before the kill"
                if any(line.get("bytes_done", 0) >= kill_at for line in reader.lines):
                    return True
                return body_recorded() == body_blocks  # stalled at the held object

            wait_for(time_to_kill, timeout=CHILD_TIMEOUT, message="the kill point")
        finally:
            kill_group(proc)
            reader.join()
        gate.release()
    assert proc.returncode == -signal.SIGKILL
    assert all(line["event"] == "progress" for line in reader.lines)
    assert "/m/zz-tail.bin" not in {
        origin_path(s.url) for s in read_metas(cache_dir).values() if s.blocks
    }
    restart_and_check(http_origin, cache_dir, files, block_size, source)
