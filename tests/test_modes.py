"""Embedded mode and a node behave the same: one scenario list, run through both.

Each scenario is a list of steps (a client call and what it returns or raises). It
runs once through an ``EmbeddedClient`` (the service in this process) and once
through a ``NodeClient`` of a real ``cachefs node``, each on its own cache with the
same configuration and the same S3 origin. Every result is compared field by field,
errors by class and message. Only what differs by nature is left out: job ids,
durations, the node's name, its uptime and call counts, and each cache's root
(paths are compared relative to it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachefs.client import NodeClient
from cachefs.node.embedded import EmbeddedClient
from cachefs.rpc_errors import message_of
from cachefs.types import CacheClient, JobStatus, NodeStatus, ObjectInfo

BLOCK = 64 * 1024
QUOTA = 64 * 1024 * 1024
MODEL = {
    "model/config.json": b'{"layers": 2}',
    "model/weights/part-1.bin": os.urandom(3 * BLOCK + 17),
    "model/weights/part-2.bin": os.urandom(BLOCK),
}
OTHER = ("other.bin", os.urandom(2 * BLOCK + 1))


@dataclass
class Context:
    """What a step needs: the client, the origin's URLs, its cache root."""

    client: CacheClient
    url: Callable[[str], str]
    root: Path


Step = tuple[str, Callable[[Context], Any]]


def _view_files(ctx: Context, holder: str, sources: list[str]) -> dict[str, int]:
    view = Path(ctx.client.view(holder, sources).path)
    return {
        str(p.relative_to(view)): p.stat().st_size
        for p in sorted(view.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _local_path(ctx: Context, key: str) -> str | None:
    return ctx.client.local_path(ctx.client.stat(ctx.url(key)))


SCENARIOS: dict[str, list[Step]] = {
    "prefetch, pin, view, unpin": [
        ("stat before", lambda c: c.client.stat(c.url("model/config.json"))),
        ("ls", lambda c: c.client.ls(c.url("model/"))),
        ("ls below", lambda c: c.client.ls(c.url("model/weights/"))),
        ("prefetch pinned", lambda c: c.client.prefetch([c.url("model/")], pin="job:a")),
        ("stat after", lambda c: c.client.stat(c.url("model/weights/part-1.bin"))),
        ("local path", lambda c: _local_path(c, "model/weights/part-1.bin")),
        ("cached", lambda c: c.client.cached()),
        ("cached under", lambda c: c.client.cached(c.url("model/weights/"))),
        ("status", lambda c: c.client.status()),
        ("view", lambda c: c.client.view("csi:vol", [c.url("model/")])),
        ("view files", lambda c: _view_files(c, "csi:vol", [c.url("model/")])),
        ("view again", lambda c: c.client.view("csi:vol", [c.url("model/")])),
        ("status with view", lambda c: c.client.status()),
        ("evict pinned", lambda c: c.client.evict([c.url("model/")])),
        ("unpin one", lambda c: c.client.unpin("job:a", [c.url("model/config.json")])),
        ("unpin the view's holder", lambda c: c.client.unpin("csi:vol")),
        ("the view is gone", lambda c: Path(c.client.view_path).exists()),
        ("unpin it again", lambda c: c.client.unpin("csi:vol")),
        ("cached after unpin", lambda c: c.client.cached()),
        ("unpin the rest", lambda c: c.client.unpin("job:a")),
        ("evict", lambda c: c.client.evict([c.url("model/")])),
        ("cached after evict", lambda c: c.client.cached()),
        ("status at the end", lambda c: c.client.status()),
    ],
    "bad input": [
        ("stat a missing object", lambda c: c.client.stat(c.url("nope.bin"))),
        ("stat a prefix", lambda c: c.client.stat(c.url("model"))),
        ("prefetch a missing object", lambda c: c.client.prefetch([c.url("nope.bin")])),
        ("prefetch a bad URL", lambda c: c.client.prefetch(["s3://"])),
        ("prefetch nothing", lambda c: c.client.prefetch([])),
        ("prefetch into no tier", lambda c: c.client.prefetch([c.url("model/")], tier="x")),
        ("evict what is not cached", lambda c: c.client.evict([c.url("model/")])),
        ("unpin an unknown holder", lambda c: c.client.unpin("job:nobody")),
        ("unpin without a holder", lambda c: c.client.unpin("")),
        ("view without a holder", lambda c: c.client.view("", [c.url("model/")])),
        ("view of nothing", lambda c: c.client.view("csi:x", [c.url("missing/")])),
        ("cancel an unknown job", lambda c: c.client.cancel("0123456789abcdef")),
        ("model where none are reconciled", lambda c: c.client.model("team-a", "llama")),
        ("model with a hostile name", lambda c: c.client.model("team-a", "../llama")),
        ("model in a hostile namespace", lambda c: c.client.model("Team A", "llama")),
        (
            "view of a model where none are reconciled",
            lambda c: c.client.view("csi:m", [c.url("model/")], model="team-a/llama", version="v"),
        ),
        ("status", lambda c: c.client.status()),
    ],
    "reads": [
        ("read cold", lambda c: _read(c, OTHER[0], 10, 2 * BLOCK)),
        ("read past the end", lambda c: _read(c, OTHER[0], 2 * BLOCK, 9 * BLOCK)),
        ("open_local", lambda c: Path(c.client.open_local(c.url(OTHER[0]))).read_bytes()),
        ("cached", lambda c: c.client.cached()),
        ("read warm", lambda c: _read(c, OTHER[0], 0, len(OTHER[1]))),
        ("readinto", lambda c: _readinto(c, "model/weights/part-1.bin", BLOCK - 5, BLOCK + 10)),
        ("readinto past the end", lambda c: _readinto(c, OTHER[0], 2 * BLOCK, 10)),
    ],
}


# Anchors: what some steps must give in both modes, so that agreeing is not enough.
EXPECTED = {
    "the view is gone": ("returned", False),
    "unpin the view's holder": ("returned", 3),
    "evict pinned": ("raised", "QuotaExceededError"),
    "cancel an unknown job": ("raised", "FileNotFoundError"),
    "unpin it again": ("returned", 0),  # released already: nothing to do
    "stat a missing object": ("raised", "FileNotFoundError"),
    "stat a prefix": ("raised", "IsADirectoryError"),
    "readinto past the end": ("raised", "ValueError"),
    "model where none are reconciled": ("raised", "ValueError"),
    "model with a hostile name": ("raised", "ValueError"),
    "model in a hostile namespace": ("raised", "ValueError"),
    "view of a model where none are reconciled": ("raised", "ValueError"),
}


def _read(ctx: Context, key: str, start: int, end: int) -> bytes:
    return ctx.client.read(ctx.client.stat(ctx.url(key)), start, end)


def _readinto(ctx: Context, key: str, start: int, length: int) -> bytes:
    into = bytearray(length)
    ctx.client.readinto(ctx.client.stat(ctx.url(key)), start, memoryview(into))
    return bytes(into)


class _Recorder:
    """Keeps the path of the last view a client built, for the step that checks it."""

    def __init__(self, client: CacheClient) -> None:
        self._client = client
        self.view_path = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def view(self, *args: Any, **kwargs: Any) -> Any:
        view = self._client.view(*args, **kwargs)
        self.view_path = view.path
        return view


def _plain(value: Any, root: Path) -> Any:
    """``value`` as plain data, without what differs by nature between the modes."""
    if isinstance(value, JobStatus):
        return _plain(dataclasses.replace(value, id="", seconds=0.0), root)
    if isinstance(value, NodeStatus):
        value = dataclasses.replace(value, node_id="", uptime_seconds=0.0, rpcs={})
        value = dataclasses.replace(
            value, jobs=tuple(dataclasses.replace(j, id="", seconds=0.0) for j in value.jobs)
        )
    if isinstance(value, ObjectInfo):
        # A node hands out its verified data file with the stat; embedded mode looks
        # it up on demand (the "local path" step compares that).
        value = dataclasses.replace(value, local_path=None, inode=0)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), root)
            for f in dataclasses.fields(value)
            if f.compare  # not ObjectInfo.handle: each client's own way to name the object
        }
    if isinstance(value, dict):
        return {k: _plain(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "<root>")
    return value


def _run(steps: list[Step], ctx: Context) -> list[tuple[str, Any]]:
    outcomes = []
    for label, step in steps:
        try:
            result: Any = ("returned", _plain(step(ctx), ctx.root))
        except Exception as exc:
            result = ("raised", type(exc).__name__, _plain(message_of(exc), ctx.root))
        outcomes.append((label, result))
    return outcomes


def _config(path: Path, root: Path) -> Path:
    tier = {"name": "disk", "path": str(root), "quota": QUOTA}
    path.write_text(yaml.safe_dump({"tiers": [tier], "block_size": BLOCK}))
    return path


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_embedded_mode_and_a_node_give_the_same_results(
    scenario: str, start_node, tmp_path: Path, s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, data in (*MODEL.items(), OTHER):
        s3.put(key, data)
    for name in [n for n in os.environ if n.startswith("CACHEFS_")]:
        monkeypatch.delenv(name)

    embedded_root = tmp_path / "embedded"
    embedded = EmbeddedClient(config=str(_config(tmp_path / "embedded.yaml", embedded_root)))
    try:
        in_process = _run(SCENARIOS[scenario], Context(_Recorder(embedded), s3.url, embedded_root))
    finally:
        embedded.engine.close()

    node_root = tmp_path / "node"
    node = start_node(
        node_root, config=_config(tmp_path / "node.yaml", node_root), tcp=False, metrics=False
    )
    client = NodeClient(node.unix_endpoint)
    through_node = _run(SCENARIOS[scenario], Context(_Recorder(client), s3.url, node_root))

    differences = [
        f"{label}:\n  embedded: {embedded_result}\n  node:     {node_result}"
        for (label, embedded_result), (_, node_result) in zip(in_process, through_node, strict=True)
        if embedded_result != node_result
    ]
    assert not differences, "\n".join(differences)
    for label, result in in_process:
        if label in EXPECTED:
            assert result[: len(EXPECTED[label])] == EXPECTED[label], (label, result)


def test_the_scenarios_reach_every_operation() -> None:
    """Every operation of ``CacheClient`` is called by some scenario (but the
    ``block_size`` property, which is configuration)."""
    import inspect

    from cachefs import types

    operations = {
        name
        for name, _ in inspect.getmembers(types.CacheClient, inspect.isfunction)
        if not name.startswith("_")
    }
    source = inspect.getsource(inspect.getmodule(test_the_scenarios_reach_every_operation))
    called = {name for name in operations if f"client.{name}(" in source}
    assert called == operations
