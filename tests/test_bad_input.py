"""Bad input fails clearly everywhere, and never writes outside the cache root.

Each case goes through the engine, the fsspec filesystem and the CLI: the error has
the right type and a message saying what was wrong and what to do; the CLI exits 1
with one ``cachefs: error:`` line on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
from servers import NobodyRunner, RangeHTTPServer, S3Bucket

from cachefs.cli import main as cli_main
from cachefs.errors import CacheDirError, QuotaExceededError
from cachefs.node.config import load_config
from cachefs.node.engine import Engine

DATA = bytes(range(256)) * 400  # 100 KiB, position-dependent bytes
BLOCK = "64KiB"
FAST_RETRY = {"attempts": 2, "base_delay": 0.01, "max_delay": 0.02}
REPO_ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path, exclude: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``root`` outside ``exclude``, with its kind and size."""
    found: dict[str, tuple[str, int]] = {}
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        if here == exclude or exclude in here.parents:
            dirs[:] = []
            continue
        for name in dirs:
            found[str((here / name).relative_to(root))] = ("dir", 0)
        for name in files:
            path = here / name
            found[str(path.relative_to(root))] = ("file", path.lstat().st_size)
    return found


@dataclass
class Sandbox:
    """A temp tree: the cache root plus a home and working directory for CLI runs."""

    root: Path
    cache: Path
    home: Path
    cwd: Path

    def snapshot(self) -> dict[str, tuple[str, int]]:
        return snapshot(self.root, self.cache)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a CLI run: no CACHEFS_ settings but ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
        env.pop("XDG_CACHE_HOME", None)
        env.update(HOME=str(self.home), PYTHONPATH=str(REPO_ROOT), **extra)
        return env

    def cli(self, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cachefs --cache-dir CACHE ARGS`` in a child process."""
        argv = [sys.executable, "-m", "cachefs.cli", "--cache-dir", str(cache or self.cache)]
        return subprocess.run(
            [*argv, *args],
            cwd=self.cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose tree outside the cache root must not change during the test."""
    root = tmp_path / "box"
    box = Sandbox(root, root / "cache", root / "home", root / "cwd")
    for path in (box.cache, box.home, box.cwd):
        path.mkdir(parents=True)
    before = box.snapshot()
    yield box
    assert box.snapshot() == before, "something was written outside the cache root"


@pytest.fixture
def engine(sandbox: Sandbox) -> Iterator[Engine]:
    """An embedded engine on the sandbox's cache root, with quick retries."""
    config = load_config(
        overrides={"cache_dir": str(sandbox.cache), "block_size": BLOCK, "retry": FAST_RETRY},
        environ={},
    )
    eng = Engine(config)
    yield eng
    eng.close()


@pytest.fixture
def cachefs(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The cachefs fsspec filesystem (unchained: full URLs as paths) on the sandbox."""
    for name in [n for n in os.environ if n.startswith("CACHEFS_")]:
        monkeypatch.delenv(name)
    return fsspec.filesystem("cachefs", cache_dir=str(sandbox.cache), skip_instance_cache=True)


def assert_cli_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1 and exactly one ``cachefs: error:`` line naming every fragment."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cachefs: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_message(exc: BaseException, *fragments: str) -> None:
    """The exception's message holds every fragment."""
    for fragment in fragments:
        assert fragment in str(exc), (fragment, str(exc))


@dataclass(frozen=True)
class Origins:
    """The test's S3 bucket and HTTP server."""

    s3: S3Bucket
    http: RangeHTTPServer


@dataclass(frozen=True)
class Case:
    """A URL that cannot be read, and what every interface must say about it."""

    url: Callable[[Origins], str]
    error: type[BaseException]
    fragments: Callable[[Origins], tuple[str, ...]]


CASES = {
    "unknown-protocol": Case(
        lambda o: "nosuchproto://bucket/key",
        ValueError,
        lambda o: ("unknown protocol 'nosuchproto'", "known: s3"),
    ),
    "malformed-no-scheme": Case(
        lambda o: "bucket-without-scheme/key",
        ValueError,
        lambda o: ("'bucket-without-scheme/key'", "s3://bucket/key"),
    ),
    "malformed-no-bucket": Case(
        lambda o: "s3://",
        ValueError,
        lambda o: ("malformed URL", "no bucket or path"),
    ),
    "malformed-http-no-host": Case(
        lambda o: "http:///path/only",
        ValueError,
        lambda o: ("malformed URL", "no host"),
    ),
    "missing-s3-object": Case(
        lambda o: o.s3.url("no/such/key.bin"),
        FileNotFoundError,
        lambda o: (o.s3.url("no/such/key.bin"), "check the URL"),
    ),
    "missing-http-object": Case(
        lambda o: o.http.url("/no/such/file.bin"),
        FileNotFoundError,
        lambda o: (o.http.url("/no/such/file.bin"), "check the URL"),
    ),
    "missing-bucket": Case(
        lambda o: "s3://cachefs-no-such-bucket-7e1/key.bin",
        FileNotFoundError,
        lambda o: ("s3://cachefs-no-such-bucket-7e1/key.bin", "check the URL"),
    ),
    "dotdot-s3": Case(
        lambda o: o.s3.url("a/../../etc/passwd"),
        ValueError,
        lambda o: ("'..' is not allowed", "name the object by its full path"),
    ),
    "dotdot-http": Case(
        lambda o: o.http.base_url + "/a/../../etc/passwd",
        ValueError,
        lambda o: ("'..' is not allowed", "name the object by its full path"),
    ),
    "dotdot-file": Case(
        lambda o: "file:///tmp/a/../../etc/passwd",
        ValueError,
        lambda o: ("'..' is not allowed", "name the object by its full path"),
    ),
    "dotdot-encoded-http": Case(
        lambda o: o.http.base_url + "/dir/%2E%2e/obj.bin",
        ValueError,
        lambda o: ("'..' is not allowed", "name the object by its full path"),
    ),
    "dotdot-double-encoded-s3": Case(
        lambda o: o.s3.url("dir/%252e%252e/obj.bin"),
        ValueError,
        lambda o: ("'%252e%252e' stands for '..'", "name the object by its full path"),
    ),
    "encoded-slash-http": Case(
        lambda o: o.http.base_url + "/dir/..%2fobj.bin",
        ValueError,
        lambda o: ("encoded '/' (%2F)", "write '/' between path segments"),
    ),
    "userinfo-http": Case(
        lambda o: o.http.base_url.replace("://", "://user:pw@") + "/obj.bin",
        ValueError,
        lambda o: ("credentials in a URL are not accepted", "origins:"),
    ),
}


@pytest.fixture
def origins(s3: S3Bucket, http_origin: RangeHTTPServer) -> Origins:
    """Both origins, each holding ``obj.bin`` and a directory ``dir/`` with one object."""
    s3.put("obj.bin", DATA)
    s3.put("dir/inner.bin", DATA[:1000])
    http_origin.put("/obj.bin", DATA)
    http_origin.put("/dir/inner.bin", DATA[:1000])
    return Origins(s3, http_origin)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_url_fails_clearly_everywhere(
    name: str, origins: Origins, engine: Engine, cachefs: Any, sandbox: Sandbox
) -> None:
    """Each bad URL: the same error type and a helpful message from engine, fsspec, CLI."""
    case = CASES[name]
    url, fragments = case.url(origins), case.fragments(origins)
    for call in (
        lambda: engine.read(url),
        lambda: engine.stat(url),
        lambda: engine.prefetch([url]),
        lambda: cachefs.cat_file(url),
        lambda: cachefs.info(url),
        lambda: cachefs.open(url).read(),
    ):
        with pytest.raises(case.error) as info:
            call()
        assert_message(info.value, *fragments)
    assert_cli_error(sandbox.cli("prefetch", url), *fragments)
    assert origins.s3.gets("obj.bin") == []
    assert origins.http.gets("/obj.bin") == []


def test_bad_url_through_chained_fsspec(origins: Origins, sandbox: Sandbox) -> None:
    """``cachefs::URL`` gives the same errors as the unchained filesystem."""
    opts = {"cache_dir": str(sandbox.cache)}
    for key, error, fragment in (
        ("missing.bin", FileNotFoundError, "check the URL"),
        ("a/../b", ValueError, "'..' is not allowed"),
        ("dir", IsADirectoryError, "is a directory"),
    ):
        with (
            pytest.raises(error) as info,
            fsspec.open(f"cachefs::{origins.s3.url(key)}", **opts) as f,
        ):
            f.read()
        assert_message(info.value, fragment)
    # fsspec itself resolves the chain's protocols: an unknown one fails there, by name.
    with pytest.raises(ValueError, match="nosuchproto"):
        fsspec.open("cachefs::nosuchproto://bucket/key", **opts).open()


def test_json_error_line(origins: Origins, sandbox: Sandbox) -> None:
    """With --json a failure also prints one JSON error event on stdout."""
    url = origins.s3.url("missing.bin")
    result = sandbox.cli("prefetch", "--json", url)
    assert_cli_error(result, url)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "error"
    assert events[-1]["kind"] == "FileNotFoundError"
    assert url in events[-1]["error"]


def test_nul_in_key(origins: Origins, engine: Engine, cachefs: Any, capsys: Any) -> None:
    """A NUL byte in a key is refused before any I/O (argv cannot carry one: in-process CLI)."""
    for url in (origins.s3.url("a\x00b"), origins.http.url("/a") + "\x00b", "file:///tmp/a\x00b"):
        for call in (
            lambda url=url: engine.read(url),
            lambda url=url: engine.prefetch([url]),
            lambda url=url: cachefs.cat_file(url),
        ):
            with pytest.raises(ValueError, match="NUL byte; remove it"):
                call()
        capsys.readouterr()
        assert cli_main(["prefetch", url]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1
        assert err[0].startswith("cachefs: error: ") and "NUL byte" in err[0]
    assert origins.s3.gets("obj.bin") == []


@pytest.mark.parametrize("kind", ["s3", "http", "file", "memory"])
def test_directory_where_an_object_was_expected(
    kind: str, origins: Origins, engine: Engine, cachefs: Any, tmp_path: Path
) -> None:
    """Reading a directory is IsADirectoryError naming it; prefetching it fetches its objects."""
    if kind == "s3":
        url = origins.s3.url("dir")
    elif kind == "http":
        url = origins.http.url("/dir")  # the server redirects to /dir/
    elif kind == "file":
        (tmp_path / "src" / "dir").mkdir(parents=True)
        (tmp_path / "src" / "dir" / "inner.bin").write_bytes(DATA[:1000])
        url = f"file://{tmp_path}/src/dir"
    else:
        fsspec.filesystem("memory").pipe(f"/{tmp_path.name}/dir/inner.bin", DATA[:1000])
        url = f"memory:///{tmp_path.name}/dir"
    for call in (
        lambda: engine.read(url),
        lambda: engine.open_local(url),
        lambda: cachefs.cat_file(url),
        lambda: cachefs.open(url).read(),
        lambda: cachefs.open_local(url),
    ):
        with pytest.raises(IsADirectoryError) as info:
            call()
        assert_message(info.value, "is a directory", "name an object in it")
    result = engine.prefetch([url])
    assert result.objects == 1
    assert engine.read(url + "/inner.bin") == DATA[:1000]


def test_empty_directory_prefetch_fails_clearly(sandbox: Sandbox, tmp_path: Path) -> None:
    """A source naming nothing (an empty directory) is an error, not an empty success."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_cli_error(
        sandbox.cli("prefetch", f"file://{empty}/"), f"file://{empty}", "check the URL"
    )


def test_bad_ranges(origins: Origins, engine: Engine, cachefs: Any) -> None:
    """Ranges past the end or negative fail with ValueError before any origin request."""
    url = origins.s3.url("obj.bin")
    size = len(DATA)
    ref = engine.stat(url)
    for call, fragment in (
        (lambda: engine.read(url, size + 1, 10), "past the end"),
        (lambda: engine.read(url, 10 * size), "past the end"),
        (lambda: engine.read(url, -1, 10), "non-negative"),
        (lambda: engine.read(url, 10, -20), "end must not precede start"),
        (lambda: engine.read_ref(ref, 0, -5), "end must not precede start"),
        (lambda: engine.read_ref(ref, -5), "non-negative"),
        (lambda: engine.readinto_ref(ref, size - 4, memoryview(bytearray(8))), "invalid range"),
        (lambda: engine.readinto_ref(ref, -4, memoryview(bytearray(8))), "invalid range"),
        (lambda: cachefs.cat_file(url, size + 1), "past the end"),
        (lambda: cachefs.cat_file(url, 50, 10), "end must not precede start"),
        (lambda: cachefs.cat_file(url, -10, -20), "end must not precede start"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert_message(info.value, fragment, url)
    assert origins.s3.gets("obj.bin") == []
    # Edges that are not errors: an empty read at the end, an end past the size clips,
    # and fsspec's negative offsets count back from the end, as its contract says.
    assert engine.read(url, size) == b""
    assert engine.read(url, size - 10, 100) == DATA[-10:]
    assert cachefs.cat_file(url, -10) == DATA[-10:]
    assert cachefs.cat_file(url, 0, -size + 5) == DATA[:5]
    assert cachefs.cat_file(url, -20, -10) == DATA[-20:-10]
    assert cachefs.cat_file(url, size - 3, size + 100) == DATA[-3:]


def test_unusable_cache_dir_as_root(origins: Origins, sandbox: Sandbox, tmp_path: Path) -> None:
    """A cache dir that cannot be created (a file in the way) is a CacheDirError."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = blocker / "cache"
    url = origins.s3.url("obj.bin")
    with pytest.raises(CacheDirError) as info:
        Engine(load_config(overrides={"cache_dir": str(bad)}, environ={}))
    assert_message(info.value, str(bad), "writable directory")
    fs = fsspec.filesystem("cachefs", cache_dir=str(bad), skip_instance_cache=True)
    with pytest.raises(CacheDirError, match="cannot use cache directory"):
        fs.cat_file(url)
    assert_cli_error(sandbox.cli("prefetch", url, cache=bad), str(bad), "writable directory")
    assert origins.s3.gets("obj.bin") == []


_NOBODY_CODE = """
import sys
import fsspec
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
cache, url = sys.argv[1], sys.argv[2]
for make in (
    lambda: Engine(load_config(overrides={"cache_dir": cache}, environ={})),
    lambda: fsspec.filesystem("cachefs", cache_dir=cache).cat_file(url),
):
    try:
        make()
    except Exception as exc:
        print(type(exc).__name__, exc)
    else:
        print("no error")
"""


def test_unwritable_cache_dir(
    run_as_nobody: NobodyRunner, tmp_path: Path, http_origin: RangeHTTPServer
) -> None:
    """A cache dir the user may not write: CacheDirError, and CLI exit 1, nothing written."""
    http_origin.put("/obj.bin", DATA)
    url = http_origin.url("/obj.bin")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o755)
    cache = readonly / "cache"
    before = snapshot(tmp_path, tmp_path / "nobody-home")
    paths = [run_as_nobody.extra_env.get("PYTHONPATH"), os.environ.get("PYTHONPATH")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    code = run_as_nobody([*run_as_nobody.python, "-c", _NOBODY_CODE, str(cache), url], env=env)
    lines = code.stdout.splitlines()
    assert len(lines) == 2, code.stdout + code.stderr
    for line in lines:
        assert line.startswith("CacheDirError cannot use cache directory"), line
        assert str(cache) in line and "writable directory" in line
    cli = run_as_nobody(
        [*run_as_nobody.python, "-m", "cachefs.cli", "--cache-dir", str(cache), "prefetch", url],
        env=env,
    )
    assert_cli_error(cli, str(cache), "writable directory")
    assert not cache.exists()
    assert snapshot(tmp_path, tmp_path / "nobody-home") == before
    assert http_origin.gets("/obj.bin") == []


def _full_disk_engine(cache: Path, quota: str | None) -> Engine:
    """An engine whose only tier is ``cache``; ``quota`` larger than the disk if given."""
    tier: dict[str, Any] = {"name": "disk", "path": str(cache)}
    if quota:
        tier["quota"] = quota
    return Engine(
        load_config(overrides={"tiers": [tier], "block_size": BLOCK}, environ={}),
    )


@pytest.mark.parametrize("quota", [None, "64MiB"], ids=["default-quota", "quota-beyond-disk"])
def test_full_disk(
    quota: str | None,
    small_tmpfs: Callable[[int], Path],
    http_origin: RangeHTTPServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache on a tiny disk: reads still return the right bytes; prefetch fails clearly.

    With the default quota (90% of the free space) the object fits in no tier; with a
    quota larger than the disk, writes hit ENOSPC. Either way nothing is corrupted.
    """
    big = os.urandom(1024 * 1024)
    http_origin.put("/big.bin", big)
    http_origin.put("/small.bin", DATA[:5000])
    url = http_origin.url("/big.bin")
    cache = small_tmpfs(256 * 1024)
    before = snapshot(tmp_path, cache)
    engine = _full_disk_engine(cache, quota)
    try:
        assert engine.read(url) == big
        assert engine.read(url, 300_000, 200_000) == big[300_000:500_000]
        with pytest.raises(QuotaExceededError) as info:
            engine.prefetch([url])
        assert_message(info.value, url)
        assert "quota" in str(info.value)
        with pytest.raises(QuotaExceededError):
            engine.open_local(url)
        assert engine.read(url, 1000, 100_000) == big[1000:101_000]
        for obj in engine.store.objects():  # whatever was cached is intact
            assert engine.store.verify(obj) == []
        small = http_origin.url("/small.bin")
        assert engine.read(small) == DATA[:5000]
    finally:
        engine.close()
    for name in [n for n in os.environ if n.startswith("CACHEFS_")]:
        monkeypatch.delenv(name)
    fs = fsspec.filesystem("cachefs", cache_dir=str(cache), skip_instance_cache=True)
    assert fs.cat_file(url, 5, 70_000) == big[5:70_000]
    with fs.open(url) as f:
        assert f.read() == big
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    result = subprocess.run(
        [sys.executable, "-m", "cachefs.cli", "--cache-dir", str(cache), "prefetch", url],
        env={**env, "HOME": str(home), "PYTHONPATH": str(REPO_ROOT)},
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_cli_error(result, url, "quota")
    home.rmdir()
    assert snapshot(tmp_path, cache) == before
