"""The engine's stat cache is bounded: a node that serves many objects keeps at most
so many stats, dropping the least recently used first, so its memory does not grow
with every URL it ever saw. Behaviour is observed through the origin's stat count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cachefs.node import engine as engine_module
from cachefs.node.engine import Engine

BOUND = 8


def origin_stats(engine: Engine) -> int:
    return engine.stats.snapshot()["origin_requests"].get("stat", 0)


@pytest.fixture
def urls(tmp_path: Path) -> list[str]:
    """200 small files on a file:// origin."""
    origin = tmp_path / "origin"
    origin.mkdir()
    found = []
    for i in range(200):
        path = origin / f"f{i:03d}.bin"
        path.write_bytes(bytes([i]) * (i + 1))
        found.append(f"file://{path}")
    return found


@pytest.fixture
def engine(make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setattr(engine_module, "_STAT_CACHE_ENTRIES", BOUND)
    return make_engine(revalidate_after=3600)  # no entry ages out during the test


def test_the_stat_cache_stays_bounded(engine: Engine, urls: list[str]) -> None:
    for url in urls:
        engine.stat(url)
    assert origin_stats(engine) == len(urls)
    assert len(engine._stat_cache) == BOUND
    for url in urls[-BOUND:]:  # the most recent are still cached
        engine.stat(url)
    assert origin_stats(engine) == len(urls)
    engine.stat(urls[0])  # long dropped: the origin is asked again
    assert origin_stats(engine) == len(urls) + 1
    assert len(engine._stat_cache) == BOUND


def test_a_stat_served_from_the_cache_counts_as_a_use(engine: Engine, urls: list[str]) -> None:
    """Least recently used, not first in: an entry read again outlives newer ones."""
    for url in urls[:BOUND]:
        engine.stat(url)
    engine.stat(urls[0])  # a hit: now the most recent
    assert origin_stats(engine) == BOUND
    for url in urls[BOUND : BOUND + 3]:  # three more push out urls[1..3]
        engine.stat(url)
    engine.stat(urls[0])
    assert origin_stats(engine) == BOUND + 3  # still cached
    engine.stat(urls[1])
    assert origin_stats(engine) == BOUND + 4  # dropped, asked again
