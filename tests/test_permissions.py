"""File modes and ownership of the cache: who may enter, read and write what.

The root is 0700 (0750 and group-owned with a configured group); nothing below it is
writable by group or others; data files are 0644 so that pods can read them, as any
uid, through hard links (views) outside the root. Root bypasses file modes, so access
is checked from a child process running as uid 65534.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import NOBODY_GID, NOBODY_UID, NobodyRunner

from cachefs.errors import CacheDirError
from cachefs.node.callers import IN_PROCESS
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.node.service import CacheService

BLOCK = 64 * 1024
OTHER_GID = 4242  # a gid that uid 65534 is not a member of

# Runs as another user: each (op, path) in argv[1] -> "ok", "ok:<xxh3 of bytes>" or errno.
PROBE = """
import errno, hashlib, json, os, sys
result = []
for op, path in json.loads(sys.argv[1]):
    try:
        if op == "list":
            os.listdir(path)
            result.append("ok")
        elif op == "read":
            with open(path, "rb") as f:
                data = f.read()
            result.append("ok:" + hashlib.sha256(data).hexdigest())
        elif op == "create":
            with open(path, "xb"):
                pass
            result.append("ok")
        elif op == "write":
            with open(path, "r+b"):
                pass
            result.append("ok")
        else:
            raise ValueError(op)
    except OSError as exc:
        result.append(errno.errorcode.get(exc.errno, str(exc.errno)))
print(json.dumps(result))
"""

EngineFactory = Callable[..., Engine]


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    """Engines on one cache directory (the default single tier), closed at teardown."""
    engines: list[Engine] = []

    def make(cache_dir: Path, **overrides: Any) -> Engine:
        settings = {"cache_dir": str(cache_dir), "block_size": "64KiB", **overrides}
        engine = Engine(load_config(overrides=settings, environ={}))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def origin(tmp_path: Path) -> dict[str, bytes]:
    """Three small objects in a directory, as file URL -> bytes."""
    directory = tmp_path / "origin"
    directory.mkdir()
    objects = {}
    for i in range(3):
        data = os.urandom(150 * 1024 + i)
        path = directory / f"part-{i}.bin"
        path.write_bytes(data)
        objects[f"file://{path}"] = data
    return objects


@pytest.fixture
def group_name() -> str:
    """The name of gid 65534's group (uid 65534's primary group)."""
    try:
        return grp.getgrgid(NOBODY_GID).gr_name
    except KeyError:
        pytest.skip(f"gid {NOBODY_GID} has no group entry on this host")


def probe(
    runner: NobodyRunner,
    ops: list[tuple[str, Path]],
    gid: int = NOBODY_GID,
    groups: tuple[int, ...] = (),
) -> list[str]:
    """Run PROBE as uid 65534 with primary group ``gid`` and supplementary ``groups``."""
    argv = [*runner.python, "-c", PROBE, json.dumps([(op, str(path)) for op, path in ops])]
    result = subprocess.run(
        argv,
        user=NOBODY_UID,
        group=gid,
        extra_groups=list(groups),
        env={**os.environ, "HOME": str(runner.home), **runner.extra_env},
        cwd=runner.home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def loose_entries(root: Path) -> list[str]:
    """Entries below ``root`` that break the rules: writable by group or others, files
    other than 0644, or anything but regular files and directories."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            perms = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                if perms & 0o022:
                    bad.append(f"{path} {perms:o}")
            elif not stat.S_ISREG(st.st_mode) or perms != 0o644:
                bad.append(f"{path} {perms:o}")
    return bad


def data_files(root: Path) -> list[Path]:
    return sorted(root.glob("v1/objects/*/*/data"))


def exercise(engine: Engine, origin: dict[str, bytes], root: Path, root_mode: int) -> None:
    """Prefetch, pin and evict, checking every mode below ``root`` after each step."""
    urls = sorted(origin)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("prefetch", lambda: engine.prefetch(urls[:2])),
        ("pin", lambda: engine.prefetch([urls[2]], pin="job:a")),
        ("read", lambda: engine.read(urls[0], 1000, 100_000)),
        ("eviction", lambda: CacheService(engine).evict(IN_PROCESS, [urls[1]])),
        ("unpin", lambda: CacheService(engine).unpin(IN_PROCESS, "job:a")),
    ]
    for step, action in steps:
        action()
        assert mode(root) == root_mode, f"after {step}"
        assert loose_entries(root) == [], f"after {step}"
    assert len(data_files(root)) == 2
    assert list(root.glob("v1/pins/*")) == []
    for path in data_files(root):
        assert mode(path) == 0o644


def test_default_root_is_private_and_nothing_below_is_writable(
    make_engine: EngineFactory, origin: dict[str, bytes], cache_dir: Path
) -> None:
    """Without a group the root is 0700; files are 0644 and no directory is writable
    by group or others, after prefetch, pin, read, eviction and unpin."""
    cache_dir.chmod(0o755)
    engine = make_engine(cache_dir)
    assert mode(cache_dir) == 0o700
    exercise(engine, origin, cache_dir, 0o700)


def test_group_root_is_0750_and_group_owned(
    make_engine: EngineFactory, origin: dict[str, bytes], cache_dir: Path, group_name: str
) -> None:
    """With ``group`` the root is 0750 and owned by that group; the rest as without."""
    engine = make_engine(cache_dir, group=group_name)
    assert mode(cache_dir) == 0o750
    assert cache_dir.stat().st_gid == NOBODY_GID
    exercise(engine, origin, cache_dir, 0o750)


def test_unknown_group_is_rejected(make_engine: EngineFactory, cache_dir: Path) -> None:
    """A group name this host does not know is a clear error, not a silent 0700."""
    with pytest.raises(ValueError, match="no-such-group-xyz"):
        make_engine(cache_dir, group="no-such-group-xyz")


def test_other_users_cannot_enter_root_but_read_data_through_a_link(
    make_engine: EngineFactory,
    origin: dict[str, bytes],
    cache_dir: Path,
    tmp_path: Path,
    run_as_nobody: NobodyRunner,
) -> None:
    """Another uid can neither list nor read inside the root, yet reads a data file's
    bytes through a hard link in a world-readable directory (how views work)."""
    engine = make_engine(cache_dir)
    url = sorted(origin)[0]
    engine.prefetch([url])
    data_path = engine.open_local(url)
    views = tmp_path / "views"
    views.mkdir()
    views.chmod(0o755)
    link = views / "model.bin"
    os.link(data_path, link)

    results = probe(
        run_as_nobody,
        [
            ("list", cache_dir),
            ("list", cache_dir / "v1"),
            ("read", data_path),
            ("create", cache_dir / "intruder"),
            ("read", link),
            ("write", link),
        ],
    )

    assert results[:4] == ["EACCES"] * 4
    assert results[4] == f"ok:{sha256(origin[url])}"
    assert results[5] == "EACCES"  # 0644: readable, not writable
    assert not (cache_dir / "intruder").exists()


def test_group_members_can_traverse_and_read(
    make_engine: EngineFactory,
    origin: dict[str, bytes],
    cache_dir: Path,
    group_name: str,
    run_as_nobody: NobodyRunner,
) -> None:
    """With a group, its members list the root and read data files in place; the same
    uid outside the group cannot; nobody may create files in the root."""
    engine = make_engine(cache_dir, group=group_name)
    url = sorted(origin)[1]
    engine.prefetch([url])
    data_path = engine.open_local(url)
    ops = [("list", cache_dir), ("read", data_path), ("create", cache_dir / "intruder")]

    member = probe(run_as_nobody, ops, gid=OTHER_GID, groups=(NOBODY_GID,))
    outsider = probe(run_as_nobody, ops, gid=OTHER_GID)

    assert member == ["ok", f"ok:{sha256(origin[url])}", "EACCES"]
    assert outsider == ["EACCES", "EACCES", "EACCES"]
    assert not (cache_dir / "intruder").exists()


@pytest.mark.parametrize(("umask", "with_group"), [(0o000, False), (0o077, False), (0o000, True)])
def test_umask_does_not_change_modes(
    make_engine: EngineFactory,
    origin: dict[str, bytes],
    tmp_path: Path,
    group_name: str,
    umask: int,
    with_group: bool,
) -> None:
    """Modes are set explicitly: a permissive or restrictive umask changes nothing.

    Missing parents the cache creates are 0755: not writable by others (who could
    swap the root), and traversable by the group's members.
    """
    root = tmp_path / "made" / "for" / "cache"
    previous = os.umask(umask)
    try:
        engine = make_engine(root, group=group_name if with_group else None)
        exercise(engine, origin, root, 0o750 if with_group else 0o700)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "made") == 0o755
    assert mode(tmp_path / "made" / "for") == 0o755


def assert_names_directory(error: BaseException, directory: Path) -> None:
    message = str(error)
    assert str(directory) in message
    assert "CACHEFS_CACHE_DIR" in message


def test_file_in_the_way_gives_cache_dir_error(make_engine: EngineFactory, tmp_path: Path) -> None:
    """A regular file where the cache directory should be: CacheDirError naming both."""
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"not a directory")
    for root in (blocker, blocker / "cache"):
        with pytest.raises(CacheDirError) as caught:
            make_engine(root)
        assert_names_directory(caught.value, root)
    assert blocker.read_bytes() == b"not a directory"


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory (holding an empty ``existing/``) behind a read-only bind mount."""
    source = tmp_path / "rw"
    (source / "existing").mkdir(parents=True)
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        remount = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(target)], capture_output=True
        )
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.decode().strip()}")
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("name", ["existing", "missing"])
def test_read_only_mount_gives_cache_dir_error(
    make_engine: EngineFactory, read_only_dir: Path, name: str
) -> None:
    """A cache directory on a read-only mount: CacheDirError naming it (EROFS)."""
    root = read_only_dir / name
    with pytest.raises(CacheDirError) as caught:
        make_engine(root)
    assert_names_directory(caught.value, root)
    assert "read-only" in str(caught.value).lower()


ENGINE_AS_NOBODY = """
import json, sys
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.errors import CacheDirError
try:
    Engine(load_config()).close()
    print(json.dumps({"ok": True}))
except CacheDirError as exc:
    print(json.dumps({"ok": False, "message": str(exc)}))
"""


def test_unwritable_cache_dir_for_another_user(tmp_path: Path, run_as_nobody: NobodyRunner) -> None:
    """A cache directory the user cannot write: CacheDirError from the engine and one
    clear line from the CLI, both naming the directory and CACHEFS_CACHE_DIR."""
    owned_by_root = tmp_path / "system"
    owned_by_root.mkdir()
    owned_by_root.chmod(0o755)
    for root in (owned_by_root, owned_by_root / "cache"):
        env = {"CACHEFS_CACHE_DIR": str(root)}
        engine = run_as_nobody(ENGINE_AS_NOBODY, env=env)
        assert engine.returncode == 0, engine.stderr
        outcome = json.loads(engine.stdout)
        assert outcome["ok"] is False
        assert str(root) in outcome["message"]
        assert "CACHEFS_CACHE_DIR" in outcome["message"]

        cli = run_as_nobody([*run_as_nobody.python, "-m", "cachefs.cli", "status"], env=env)
        assert cli.returncode == 1
        lines = cli.stderr.strip().splitlines()
        assert len(lines) == 1, cli.stderr
        assert lines[0].startswith("cachefs: error: ")
        assert str(root) in lines[0] and "CACHEFS_CACHE_DIR" in lines[0]
    assert list(owned_by_root.iterdir()) == []
    assert mode(owned_by_root) == 0o755
