"""Shared fixtures: real origin servers, scratch directories and unprivileged runs."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import site
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemon import CsiProcess, NodeProcess
from servers import (
    AWS_ENV_TO_CLEAR,
    NOBODY_GID,
    NOBODY_UID,
    NobodyRunner,
    RangeHTTPServer,
    S3Bucket,
    S3Server,
    make_traversable,
)

from cachefs.node.config import load_config
from cachefs.node.engine import Engine

REPO_ROOT = Path(__file__).resolve().parents[1]


def _clear_s3fs_instances() -> None:
    """Drop cached S3FileSystem instances so none outlives the test that configured it."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session; tests use the per-test ``s3`` facade."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh bucket on the shared S3 server, with AWS env vars pointing at it.

    The request log, faults and gates start empty, so counts cover this test only.
    """
    s3_server.reset()
    for name in AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    _clear_s3fs_instances()
    bucket = S3Bucket(s3_server, f"cachefs-test-{uuid.uuid4().hex[:12]}")
    s3_server.create_bucket(bucket.name)
    yield bucket
    s3_server.reset()
    _clear_s3fs_instances()
    s3_server.delete_bucket(bucket.name)


@pytest.fixture
def http_origin() -> Iterator[RangeHTTPServer]:
    """A private HTTP/1.1 origin with range, ETag and directory-index support."""
    with RangeHTTPServer() as server:
        yield server


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty directory for a cache to live in."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Factory mounting a tmpfs of ``size_bytes`` (rounded up to pages), for full-disk tests.

    Unmounted at teardown. Skips when this environment cannot mount (needs root).
    """
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        target = tmp_path / f"tmpfs-{len(mounted)}"
        target.mkdir()
        argv = ["mount", "-t", "tmpfs", "-o", f"size={int(size_bytes)},mode=0755", "tmpfs"]
        try:
            result = subprocess.run(
                [*argv, str(target)], capture_output=True, text=True, timeout=30
            )
        except FileNotFoundError:
            pytest.skip("small_tmpfs: no 'mount' command in this environment")
        if result.returncode != 0:
            pytest.skip(
                "small_tmpfs: mounting a tmpfs is not permitted here (needs root or "
                f"CAP_SYS_ADMIN): {result.stderr.strip()}"
            )
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True, capture_output=True)


def _runs_as_nobody(argv: list[str], env: dict[str, str]) -> bool:
    try:
        result = subprocess.run(
            [*argv, "-c", "import fsspec"],
            user=NOBODY_UID,
            group=NOBODY_GID,
            extra_groups=[],
            env={**os.environ, **env},
            cwd="/",
            capture_output=True,
            timeout=60,
        )
    except PermissionError:
        return False
    return result.returncode == 0


@pytest.fixture(scope="session")
def nobody_python(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[str], dict[str, str]]:
    """An interpreter uid 65534 can run with this environment's packages, plus its env.

    The test interpreter may sit under a directory that user cannot enter; then the
    system interpreter of the same version is used, and a ``sitecustomize`` on its
    PYTHONPATH adds this environment's site-packages as site directories, so that
    their ``.pth`` files run too (the editable install maps ``cachefs.node`` and
    ``cachefs.csi`` to the repository's folders through one).
    """
    if os.geteuid() != 0:
        pytest.skip("run_as_nobody needs root to switch to uid 65534")
    if _runs_as_nobody([sys.executable], {}):
        return [sys.executable], {}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    hook = tmp_path_factory.mktemp("nobody-site")
    hook.chmod(0o755)
    make_traversable(hook, hook.parent.parent)
    sitecustomize = hook / "sitecustomize.py"
    sitecustomize.write_text(
        "import site\n" + "".join(f"site.addsitedir({path!r})\n" for path in site.getsitepackages())
    )
    sitecustomize.chmod(0o644)
    paths = [str(hook)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    # PATH may lead to per-user shims that user cannot enter; system dirs come after.
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/local/bin", "/usr/bin"]
    for candidate in dict.fromkeys(str(Path(d) / version) for d in dirs if d):
        if os.access(candidate, os.X_OK) and _runs_as_nobody([candidate], env):
            return [candidate], env
    pytest.skip(f"no {version} interpreter that uid 65534 can run")


@pytest.fixture
def run_as_nobody(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    nobody_python: tuple[list[str], dict[str, str]],
) -> NobodyRunner:
    """Run argv or Python code as uid/gid 65534, since root bypasses file permissions.

    ``tmp_path`` and its parents get search permission (o+x only), so what that user
    can read or write below ``tmp_path`` depends on the modes the code under test set.
    """
    basetemp = tmp_path_factory.getbasetemp()
    stop = basetemp.parent if basetemp.parent.name.startswith("pytest-of-") else basetemp
    make_traversable(tmp_path, stop)
    home = tmp_path / "nobody-home"
    home.mkdir()
    os.chown(home, NOBODY_UID, NOBODY_GID)
    python, env = nobody_python
    return NobodyRunner(python, home, env)


SMALL_BLOCK = 16 * 1024


@pytest.fixture
def make_engine(cache_dir: Path) -> Iterator[Callable[..., Engine]]:
    """Engines on ``cache_dir`` with 16 KiB blocks (many blocks, little data), the
    process environment ignored; closed at teardown. Keyword arguments override
    config keys."""
    engines: list[Engine] = []

    def make(**overrides: Any) -> Engine:
        settings = {"cache_dir": str(cache_dir), "block_size": SMALL_BLOCK, **overrides}
        engine = Engine(load_config(overrides=settings, environ={}))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Factory of real ``cachefs node`` processes (unix socket + TCP on 127.0.0.1:0),
    ready when returned; every one is killed at teardown."""
    nodes: list[NodeProcess] = []

    def start(cache_dir: Path | None = None, **kwargs: Any) -> NodeProcess:
        cache = cache_dir or tmp_path / "node-cache"
        socket_path = kwargs.pop("socket_path", tmp_path / f"node-{len(nodes)}.sock")
        ready = kwargs.pop("ready", True)
        node = NodeProcess(cache, socket_path, **kwargs)
        nodes.append(node)
        return node.wait_ready() if ready else node

    yield start
    for node in nodes:
        node.kill()
    from cachefs.client import close_clients

    close_clients()  # no test's channel outlives its node


@pytest.fixture
def start_csi(tmp_path: Path) -> Iterator[Callable[..., CsiProcess]]:
    """Factory of real ``cachefs csi`` processes on a socket under ``tmp_path``; at
    teardown they are killed and every mount left under ``tmp_path`` is undone."""
    plugins: list[CsiProcess] = []

    def start(node_endpoint: str, **kwargs: Any) -> CsiProcess:
        plugin = CsiProcess(
            kwargs.pop("socket_path", tmp_path / "csi.sock"),
            node_endpoint,
            kwargs.pop("state_dir", tmp_path / "csi-state"),
            **kwargs,
        )
        plugins.append(plugin)
        return plugin.wait_ready()

    yield start
    for plugin in plugins:
        plugin.kill()
    for target in reversed(mounts_under(tmp_path)):
        subprocess.run(["umount", "-l", target], capture_output=True)


def mounts_under(root: Path) -> list[str]:
    prefix = os.path.realpath(root) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


# -- documented names: what a test claims to exercise ------------------------------------
#
# ``@pytest.mark.exercises("--peers", "CACHEFS_ENDPOINT", ...)`` claims that the test runs
# the CLI as a subprocess with those flags and variables (tests/test_documented_names.py
# counts the claims). The fixture below holds the test to them: it records the argv and
# environment of every ``cachefs`` process the test starts.


def cli_argv(args: Any, shell: bool = False) -> list[str] | None:
    """``args`` of a Popen as a list of strings when it runs the ``cachefs`` command
    (``python -m cachefs.cli ...`` or an executable named ``cachefs``), else None."""
    if isinstance(args, str | bytes | os.PathLike):
        argv = shlex.split(os.fsdecode(args)) if shell else [os.fsdecode(args)]
    else:
        argv = [os.fsdecode(arg) for arg in args]
    module = any(a == "-m" and b == "cachefs.cli" for a, b in itertools.pairwise(argv))
    return argv if argv and (module or Path(argv[0]).name == "cachefs") else None


def name_pattern(name: str) -> re.Pattern[str]:
    """A documented name as a regex: ``<KEY>``, ``<SECTION>`` stand for one config key
    (``CACHEFS_<SECTION>__<KEY>`` is matched by ``CACHEFS_RETRY__ATTEMPTS``)."""
    parts = re.split(r"<[A-Z]+>", name)
    return re.compile("[A-Z0-9]+(?:_[A-Z0-9]+)*".join(map(re.escape, parts)))


def _exercised(name: str, runs: Sequence[tuple[list[str], Mapping[str, str]]]) -> bool:
    if name.startswith("-"):
        return any(arg == name or arg.startswith(name + "=") for argv, _ in runs for arg in argv)
    pattern = name_pattern(name)
    return any(pattern.fullmatch(variable) for _, env in runs for variable in env)


@pytest.fixture(autouse=True)
def _claimed_names_are_exercised(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """For a test marked ``exercises``: fail at teardown unless a ``cachefs`` process it
    started had each claimed flag in its argv and each claimed variable set."""
    claimed = [name for mark in request.node.iter_markers("exercises") for name in mark.args]
    if not claimed:
        yield
        return
    runs: list[tuple[list[str], Mapping[str, str]]] = []

    class RecordingPopen(subprocess.Popen):  # subprocess.run starts its children through it
        def __init__(self, args: Any, *positional: Any, **options: Any) -> None:
            argv = cli_argv(args, options.get("shell", False))
            if argv is not None:
                env = options.get("env")
                runs.append((argv, dict(os.environ if env is None else env)))
            super().__init__(args, *positional, **options)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    yield
    missing = [name for name in claimed if not _exercised(name, runs)]
    if missing:
        pytest.fail(
            f"{request.node.nodeid} claims to exercise {', '.join(missing)}, but none of the "
            f"{len(runs)} cachefs processes it started had them in its argv or environment",
            pytrace=False,
        )
