"""The ``cachefs`` command: prefetch, ls, evict, unpin, status, exit codes, progress bar."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import interrupt_when_held
from servers import RangeHTTPServer, S3Bucket

REPO_ROOT = Path(__file__).resolve().parents[1]
KIB = 1024
DATA_A = os.urandom(200 * KIB)
DATA_B = os.urandom(50 * KIB)
LOGIN = "cachefs-tester"


@dataclass
class Cli:
    """Runs ``python -m cachefs.cli`` in a child with a clean CACHEFS_ environment."""

    home: Path
    env_extra: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """The child's environment: no inherited CACHEFS_ settings, 64 KiB blocks."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
        env.pop("XDG_CACHE_HOME", None)
        env.update(
            HOME=str(self.home),
            PYTHONPATH=str(REPO_ROOT),
            LOGNAME=LOGIN,
            USER=LOGIN,
            CACHEFS_BLOCK_SIZE="64KiB",
        )
        env.update(self.env_extra)
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        """The command line that runs the CLI with ``args``."""
        return [sys.executable, "-m", "cachefs.cli", *args]

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            env=self.env(**env),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A CLI runner whose HOME (and so default cache dir) is private to the test."""
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 0 with nothing on stderr; return stdout."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert exit 1 with one ``cachefs: error:`` line holding ``fragments``."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachefs: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` parsed as JSON."""
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def files(http_origin: RangeHTTPServer) -> RangeHTTPServer:
    """An HTTP origin with ``/m/a.bin`` (200 KiB) and ``/m/b.bin`` (50 KiB)."""
    http_origin.put("/m/a.bin", DATA_A)
    http_origin.put("/m/b.bin", DATA_B)
    return http_origin


@pytest.mark.exercises("--json", "--cache-dir")
def test_prefetch_json(cli: Cli, files: RangeHTTPServer, cache_dir: Path) -> None:
    """--json: progress events with rising counts, then a summary; a rerun fetches nothing."""
    total = len(DATA_A) + len(DATA_B)
    events = json_lines(
        ok(cli("--cache-dir", str(cache_dir), "prefetch", "--json", files.url("/m/")))
    )
    *progress, done = events
    assert progress and all(e["event"] == "progress" for e in progress)
    assert [e["bytes_done"] for e in progress] == sorted(e["bytes_done"] for e in progress)
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == total
    assert progress[-1]["objects_done"] == progress[-1]["objects_total"] == 2
    assert done["event"] == "done"
    assert (done["bytes"], done["objects"]) == (total, 2)
    assert (done["fetched_bytes"], done["cached_bytes"]) == (total, 0)
    assert done["pinned_by"] is None
    assert sorted(r for r in files.gets("/m/a.bin")) == [
        (0, 65535),
        (65536, 131071),
        (131072, 196607),
        (196608, len(DATA_A) - 1),
    ]

    again = json_lines(
        ok(cli("prefetch", "--json", files.url("/m/"), "--cache-dir", str(cache_dir)))
    )
    assert (again[-1]["fetched_bytes"], again[-1]["cached_bytes"]) == (0, total)
    assert len(files.gets("/m/a.bin")) == 4


def test_prefetch_human_output(cli: Cli, files: RangeHTTPServer, cache_dir: Path) -> None:
    """Without --json: one summary line, and no progress bar when stderr is not a terminal."""
    out = ok(cli("--cache-dir", str(cache_dir), "prefetch", files.url("/m/a.bin")))
    assert re.fullmatch(
        r"prefetched 1 object, 200\.0 KiB \(200\.0 KiB from the origin, 0 B already cached\)"
        r" in \d+\.\ds\n",
        out,
    ), out
    out = ok(cli("--cache-dir", str(cache_dir), "prefetch", "--pin", files.url("/m/")))
    assert "prefetched 2 objects, 250.0 KiB (50.0 KiB from the origin, 200.0 KiB already" in out
    assert out.rstrip().endswith(f"pinned by user:{LOGIN}")


def test_s3_prefetch_and_ls(cli: Cli, s3: S3Bucket, cache_dir: Path) -> None:
    """An S3 prefix: every object fetched; ls --json shows URL, size, tier, completeness."""
    s3.put("m/a.bin", DATA_A)
    s3.put("m/sub/b.bin", DATA_B)
    done = json_lines(ok(cli("--cache-dir", str(cache_dir), "prefetch", "--json", s3.url("m/"))))
    assert (done[-1]["objects"], done[-1]["bytes"]) == (2, len(DATA_A) + len(DATA_B))
    listed = json_lines(ok(cli("--cache-dir", str(cache_dir), "ls", "--json")))
    assert [(e["url"], e["size"], e["tier"], e["complete"]) for e in listed] == [
        (s3.url("m/a.bin"), len(DATA_A), "disk", True),
        (s3.url("m/sub/b.bin"), len(DATA_B), "disk", True),
    ]
    assert all(e["cached_bytes"] == e["size"] and e["pinned_by"] == [] for e in listed)
    assert listed[0]["version"].startswith("etag:")


@pytest.mark.exercises("--pin", "--holder", "--json", "--cache-dir")
def test_ls_pin_evict_unpin(cli: Cli, files: RangeHTTPServer, cache_dir: Path) -> None:
    """A pinned object cannot be evicted (a clear error) until its holder unpins it."""
    a, b = files.url("/m/a.bin"), files.url("/m/b.bin")
    c = ("--cache-dir", str(cache_dir))
    ok(cli(*c, "prefetch", "--pin", "--holder", "job:train", a))
    ok(cli(*c, "prefetch", b))
    listed = {e["url"]: e for e in json_lines(ok(cli(*c, "ls", "--json")))}
    assert listed[a]["pinned_by"] == ["job:train"] and listed[b]["pinned_by"] == []
    assert (listed[a]["size"], listed[a]["tier"], listed[a]["complete"]) == (
        len(DATA_A),
        "disk",
        True,
    )
    human = ok(cli(*c, "ls", files.url("/m/"))).splitlines()
    version = {u: e["version"].replace('"', "") for u, e in listed.items()}
    short = {u: v if len(v) <= 24 else f"{v[:12]}…{v[-8:]}" for u, v in version.items()}
    assert human == [
        f"{a}  {short[a]}  200.0 KiB  disk  complete  pinned by job:train",
        f"{b}  {short[b]}  50.0 KiB  disk  complete",
    ]
    assert [e["url"] for e in json_lines(ok(cli(*c, "ls", "--json", b)))] == [b]

    failed(cli(*c, "evict", a), "pinned", "job:train", "unpin")
    failed(cli(*c, "evict", files.url("/m/")), "1 of the 2 objects are pinned", "job:train")
    assert len(json_lines(ok(cli(*c, "ls", "--json")))) == 2  # a failed evict evicts nothing
    # Nothing to release, nothing to evict: done already, so success that says so.
    assert ok(cli(*c, "unpin", "--holder", "job:nobody", a)) == (
        "released 0 pins of job:nobody (it holds none of these)\n"
    )
    assert ok(cli(*c, "unpin", "--holder", "job:train", a)) == "released 1 pin of job:train\n"
    assert ok(cli(*c, "evict", a)) == "evicted 1 object\n"
    assert [e["url"] for e in json_lines(ok(cli(*c, "ls", "--json")))] == [b]
    assert ok(cli(*c, "evict", a)) == "evicted 0 objects (nothing cached matches)\n"
    evicted = json_lines(ok(cli(*c, "evict", "--json", b)))
    assert evicted == [{"event": "done", "objects": 1, "bytes": evicted[0]["bytes"]}]
    assert evicted[0]["bytes"] >= len(DATA_B)
    assert ok(cli(*c, "ls")) == ""
    assert not list((cache_dir / "v1" / "objects").glob("*/*/data"))


def test_default_holder_and_unpin_all(cli: Cli, files: RangeHTTPServer, cache_dir: Path) -> None:
    """--pin without --holder pins as user:<login>; unpin without sources releases all."""
    c = ("--cache-dir", str(cache_dir))
    done = json_lines(ok(cli(*c, "prefetch", "--pin", "--json", files.url("/m/"))))[-1]
    assert done["pinned_by"] == f"user:{LOGIN}"
    status = json_lines(ok(cli(*c, "status", "--json")))[0]
    assert status["pins"] == {f"user:{LOGIN}": 2}
    out = json_lines(ok(cli(*c, "unpin", "--json")))
    assert out == [{"event": "done", "holder": f"user:{LOGIN}", "objects": 2}]
    assert json_lines(ok(cli(*c, "status", "--json")))[0]["pins"] == {}


def test_holder_without_pin_is_an_error(cli: Cli, files: RangeHTTPServer, cache_dir: Path) -> None:
    """--holder names a pin's holder: without --pin it is refused, and nothing is fetched."""
    failed(
        cli("--cache-dir", str(cache_dir), "prefetch", "--holder", "job:x", files.url("/m/a.bin")),
        "--holder",
        "--pin",
    )
    assert files.gets("/m/a.bin") == []


def _two_tier_config(tmp_path: Path) -> Path:
    """A config file with two tiers, ``fast`` (1 MiB) and ``disk`` (8 MiB)."""
    config = tmp_path / "cachefs.yaml"
    config.write_text(
        f"block_size: 64KiB\ntiers:\n"
        f"  - {{name: fast, path: {tmp_path / 'fast'}, quota: 1MiB}}\n"
        f"  - {{name: disk, path: {tmp_path / 'disk'}, quota: 8MiB}}\n"
    )
    return config


@pytest.mark.exercises("--tier", "--config", "--json")
def test_tier_and_status(cli: Cli, files: RangeHTTPServer, tmp_path: Path) -> None:
    """--tier places objects in the named tier; status reports each tier's use and quota."""
    config = str(_two_tier_config(tmp_path))
    ok(cli("--config", config, "prefetch", "--tier", "disk", files.url("/m/a.bin")))
    ok(cli("--config", config, "prefetch", "--tier", "fast", files.url("/m/b.bin")))
    tiers = {e["url"]: e["tier"] for e in json_lines(ok(cli("--config", config, "ls", "--json")))}
    assert tiers == {files.url("/m/a.bin"): "disk", files.url("/m/b.bin"): "fast"}
    assert list((tmp_path / "fast" / "v1" / "objects").glob("*/*/data"))
    status = json_lines(ok(cli("status", "--json", "--config", config)))
    assert len(status) == 1
    usage = {t["name"]: t for t in status[0]["tiers"]}
    assert (usage["fast"]["quota"], usage["disk"]["quota"]) == (1024 * KIB, 8192 * KIB)
    assert (usage["fast"]["medium"], usage["disk"]["medium"]) == ("disk", "disk")
    assert usage["disk"]["used"] >= len(DATA_A) and usage["fast"]["used"] >= len(DATA_B)
    assert (usage["fast"]["objects"], usage["disk"]["objects"]) == (1, 1)
    assert usage["disk"]["path"] == str(tmp_path / "disk")
    human = ok(cli("--config", config, "status")).splitlines()
    assert human[0].startswith(f"tier fast (disk) {tmp_path / 'fast'}: ")
    assert "of 1.0 MiB used" in human[0] and "1 object" in human[0]
    failed(
        cli("--config", config, "prefetch", "--tier", "tape", files.url("/m/a.bin")),
        "no tier named 'tape'",
        "fast, disk",
    )


@pytest.mark.exercises("CACHEFS_CACHE_DIR", "CACHEFS_CONFIG", "CACHEFS_<KEY>", "--cache-dir")
def test_environment_variables(cli: Cli, files: RangeHTTPServer, tmp_path: Path) -> None:
    """CACHEFS_CACHE_DIR and CACHEFS_CONFIG choose the cache; --cache-dir beats both."""
    env_cache = tmp_path / "env-cache"
    ok(cli("prefetch", files.url("/m/b.bin"), CACHEFS_CACHE_DIR=str(env_cache)))
    assert len(list((env_cache / "v1" / "objects").glob("*/*/meta"))) == 1
    status = json_lines(ok(cli("status", "--json", CACHEFS_CACHE_DIR=str(env_cache))))[0]
    assert [t["path"] for t in status["tiers"]] == [str(env_cache)]

    config = _two_tier_config(tmp_path)
    ok(cli("prefetch", files.url("/m/a.bin"), CACHEFS_CONFIG=str(config)))
    listed = json_lines(ok(cli("ls", "--json", CACHEFS_CONFIG=str(config))))
    assert [(e["url"], e["tier"]) for e in listed] == [(files.url("/m/a.bin"), "fast")]

    arg_cache = tmp_path / "arg-cache"
    ok(cli("--cache-dir", str(arg_cache), "prefetch", files.url("/m/b.bin"),
           CACHEFS_CACHE_DIR=str(env_cache)))  # fmt: skip
    assert len(list((arg_cache / "v1" / "objects").glob("*/*/meta"))) == 1
    assert not (cli.home / ".cache").exists()  # the default cache dir was never touched

    bad = tmp_path / "bad.yaml"
    bad.write_text("blokc_size: 1MiB\n")
    failed(cli("status", CACHEFS_CONFIG=str(bad)), "unknown config keys: blokc_size")
    failed(cli("status", CACHEFS_CACHE_DIR=str(env_cache), CACHEFS_BLOCK_SIZE="5000"), "4 KiB")


def test_usage_errors_exit_2(cli: Cli) -> None:
    """Command-line mistakes are argparse usage errors: exit 2 with a usage line."""
    for args in ((), ("frobnicate",), ("prefetch",), ("ls", "--bogus")):
        result = cli(*args)
        assert result.returncode == 2, args
        assert "usage: cachefs" in result.stderr
    assert "prefetch" in ok(cli("--help"))


def test_interrupt_exits_130(cli: Cli, files: RangeHTTPServer, cache_dir: Path) -> None:
    """Ctrl-C during a prefetch: exit 130 and a one-line note, without waiting for the
    fills in flight (the held GET is only released after the exit)."""
    with files.hold_gets("/m/a.bin") as gate:
        argv = cli.argv("--cache-dir", str(cache_dir), "prefetch", files.url("/m/a.bin"))
        code, out, err = interrupt_when_held(argv, cli.env(), gate)
    assert code == 130, (out, err)
    assert err.strip().splitlines()[-1] == "cachefs: interrupted"


def _run_in_pty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin, stdout and stderr; return its output."""
    master, slave = os.openpty()
    child = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return child.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.fixture
def big_file(http_origin: RangeHTTPServer) -> Iterator[str]:
    """A 2 MiB object: 32 blocks, enough for several progress frames."""
    http_origin.put("/big.bin", os.urandom(2 * 1024 * KIB))
    yield http_origin.url("/big.bin")


def test_progress_bar_on_a_terminal(cli: Cli, big_file: str, cache_dir: Path) -> None:
    """On a terminal the prefetch draws a bar with bytes done, total and a rate."""
    code, output = _run_in_pty(
        cli.argv("--cache-dir", str(cache_dir), "prefetch", big_file), cli.env()
    )
    assert code == 0, output
    frames = [f for f in output.split("\r") if f.startswith("[")]
    assert frames, output
    bar = r"\[(#*)(\.*)\] ([\d.]+ (?:B|KiB|MiB)) / 2\.0 MiB  ([\d.]+) (B|KiB|MiB|GiB)/s  ETA "
    last = re.match(bar, frames[-1])
    assert last, frames[-1]
    assert last.group(1) == "#" * 28 and last.group(2) == ""
    assert last.group(3) == "2.0 MiB"
    assert float(last.group(4)) > 0
    assert "1/1 objects" in frames[-1]
    assert "prefetched 1 object, 2.0 MiB" in output
