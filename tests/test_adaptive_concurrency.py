"""Each origin host's adaptive limit on requests in flight (node/origins/adaptive.py).

The controller is fed synthetic rounds on an injected clock: it rises while the rate
grows with it, goes back and holds at a plateau, halves on push-back (once per
round), and stays within its floor and ceiling. Then a real engine against a real S3
server that answers SlowDown: the limit falls, the metric shows it, and the
prefetch still brings every byte.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
from servers import S3Bucket, wait_for

from cachefs.errors import OriginUnavailableError, TransientOriginError, VersionChangedError
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.node.metrics import CallStats, NodeCollector
from cachefs.node.origins.adaptive import AdaptiveLimit, HostRequests, is_pushback
from cachefs.node.origins.fill_pool import FillPool

BLOCK = 8 * 1024 * 1024
MB = 1e6


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(
    clock: Clock, initial: int = 16, ceiling: int = 64, hold: float = 30.0
) -> AdaptiveLimit:
    return AdaptiveLimit(initial, 1, ceiling, hold, clock=clock)


def run_round(control: AdaptiveLimit, clock: Clock, rate: Callable[[int], float]) -> None:
    """One full round at ``rate(limit)`` bytes per second: ``limit`` reads of BLOCK,
    with requests waiting for the limit all along."""
    n = control.limit
    control.saturated()
    for _ in range(n - 1):
        control.completed(BLOCK)
    clock.now += n * BLOCK / rate(n)
    control.completed(BLOCK)


def per_connection(mb_s: float, cap_mb_s: float = float("inf")) -> Callable[[int], float]:
    """An origin that serves each connection at ``mb_s`` up to ``cap_mb_s`` in all."""
    return lambda n: min(n * mb_s, cap_mb_s) * MB


# -- the controller ---------------------------------------------------------------------


def test_rises_while_the_rate_grows_with_the_limit_up_to_the_ceiling() -> None:
    clock = Clock()
    control = limiter(clock)
    seen = []
    for _ in range(8):
        run_round(control, clock, per_connection(42))
        seen.append(control.limit)
    assert seen[:4] == [24, 36, 54, 64]
    assert max(seen) == 64 and seen[-1] == 64


def test_goes_back_and_holds_where_the_rate_stops_growing() -> None:
    clock = Clock()
    control = limiter(clock, hold=30)
    origin = per_connection(42, cap_mb_s=1000)  # 16: 672 MB/s; 24: 1000; 36: 1000
    run_round(control, clock, origin)
    assert control.limit == 24  # a trial
    run_round(control, clock, origin)
    assert control.limit == 36  # 24 paid (+49% for +50%): the next trial
    run_round(control, clock, origin)
    assert control.limit == 24  # 36 brought nothing: back
    plateau = clock.now
    while control.limit == 24:  # rounds of 0.2 s each
        run_round(control, clock, origin)
    assert control.limit == 36  # tried again...
    assert clock.now - plateau >= 30  # ...once the hold was over
    run_round(control, clock, origin)
    assert control.limit == 24  # and back


def test_a_fast_local_origin_stays_at_the_initial_limit() -> None:
    """The rate is what this node's CPU allows, whatever the limit: no rise pays."""
    clock = Clock()
    control = limiter(clock)
    flat = per_connection(1000, cap_mb_s=1200)
    run_round(control, clock, flat)
    run_round(control, clock, flat)
    assert control.limit == 16
    for _ in range(10):
        run_round(control, clock, flat)
        assert control.limit == 16


def test_a_round_counts_busy_time_only() -> None:
    """Time with nothing in flight (between two prefetches) is no part of a round."""
    clock = Clock()
    control = limiter(clock, hold=0)
    origin = per_connection(42, cap_mb_s=1000)
    run_round(control, clock, origin)
    run_round(control, clock, origin)
    run_round(control, clock, origin)
    assert control.limit == 24  # 36 did not pay
    clock.now += 60  # idle
    control.resumed()
    run_round(control, clock, origin)  # at 24, 1000 MB/s: then a trial of 36
    run_round(control, clock, origin)
    assert control.limit == 24  # judged against 1000 MB/s, not an idle minute


def test_rounds_without_waiting_requests_change_nothing() -> None:
    clock = Clock()
    control = limiter(clock)
    for _ in range(5):
        for _ in range(control.limit):
            control.completed(BLOCK)
        clock.now += 0.1
    assert control.limit == 16


def test_push_back_halves_once_per_round_down_to_the_floor() -> None:
    clock = Clock()
    control = limiter(clock, initial=16)
    in_flight_before = clock.now
    clock.now += 0.01
    control.pushed_back(in_flight_before)
    assert control.limit == 8 and control.cuts == 1
    # The other requests in flight under 16 meet the same overload: no further cut.
    for _ in range(15):
        control.pushed_back(in_flight_before)
    assert control.limit == 8
    for expected in (4, 2, 1, 1, 1):
        clock.now += 0.01
        control.pushed_back(clock.now)  # a request started after the last cut
        assert control.limit == expected
    assert control.cuts == 4  # the floor cannot be lowered


def test_rises_wait_for_the_hold_after_push_back() -> None:
    clock = Clock()
    control = limiter(clock, hold=10)
    control.pushed_back(clock.now)
    assert control.limit == 8
    cut = clock.now
    while control.limit == 8:
        run_round(control, clock, per_connection(42))
    assert control.limit == 12 and clock.now - cut >= 10


def test_never_leaves_its_bounds() -> None:
    rng = random.Random(7)
    clock = Clock()
    control = limiter(clock, initial=4, ceiling=20, hold=0.5)
    for _ in range(2000):
        if rng.random() < 0.1:
            control.pushed_back(clock.now - rng.random())
        else:
            run_round(control, clock, lambda n: rng.uniform(1, 500) * n * MB)
        clock.now += rng.random() * 0.3
        assert 1 <= control.limit <= 20


@pytest.mark.parametrize(
    ("error", "pushback"),
    [
        (TransientOriginError("503 SlowDown", throttled=True), True),
        (TransientOriginError("429", retry_after=3.0), True),
        (TransientOriginError("HTTP 503"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (FileNotFoundError(errno.ENOENT, "no such key"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (VersionChangedError("s3://b/k", "v1", "412"), False),
        (OriginUnavailableError("the breaker is open"), False),
    ],
)
def test_what_counts_as_push_back(error: BaseException, pushback: bool) -> None:
    assert is_pushback(error) is pushback


def test_host_requests_count_reads_and_cut_on_push_back() -> None:
    clock = Clock()
    host = HostRequests(limiter(clock, initial=4))
    with host.held(BLOCK):
        assert host.in_flight == 1
    assert host.in_flight == 0
    with pytest.raises(TransientOriginError), host.held(BLOCK):
        raise TransientOriginError("SlowDown", throttled=True)
    assert host.control.limit == 2 and host.in_flight == 0
    with pytest.raises(FileNotFoundError), host.held(BLOCK):
        raise FileNotFoundError(errno.ENOENT, "gone")
    assert host.control.limit == 2 and host.control.cuts == 1


# -- the fill pool ------------------------------------------------------------------------


def test_the_fill_pool_runs_no_more_than_its_width_and_follows_it() -> None:
    width = [2]
    release = threading.Event()
    started: list[int] = []
    lock = threading.Lock()

    def task(i: int) -> int:
        with lock:
            started.append(i)
        release.wait(timeout=30)
        return i

    pool = FillPool(8, lambda: width[0], "test-fill")
    try:
        futures = [pool.submit(task, i) for i in range(6)]
        wait_for(lambda: len(started) == 2, message="two tasks running")
        assert pool.running == 2
        width[0] = 4  # seen when a task ends
        release.set()
        assert [f.result(timeout=30) for f in futures] == list(range(6))
        assert sorted(started) == list(range(6))
    finally:
        release.set()
        pool.shutdown(wait=True)


def test_a_task_waiting_for_room_has_not_started() -> None:
    """What a cancelled prefetch relies on: its fills that wait for room look at its
    stop flag when they start, as tasks still queued on a fixed pool would."""
    stop = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        release.wait(timeout=30)

    def later() -> str:
        if stop.is_set():
            return "skipped"
        ran.append("later")
        return "filled"

    pool = FillPool(4, lambda: 1, "test-fill")
    try:
        blocker = pool.submit(first)
        wait_for(lambda: ran == ["first"], message="the first task running")
        waiting = pool.submit(later)
        stop.set()
        release.set()
        blocker.result(timeout=30)
        assert waiting.result(timeout=30) == "skipped" and ran == ["first"]
    finally:
        release.set()
        pool.shutdown(wait=True)


# -- configuration ------------------------------------------------------------------------


def test_config_keys_and_their_variables(tmp_path: Any) -> None:
    config = load_config(overrides={"cache_dir": str(tmp_path)}, environ={})
    assert config.origin_limit.adaptive and config.origin_limit.max == 64
    # A concurrency the config names is a fixed number of fills, unless asked otherwise.
    config = load_config(
        overrides={"cache_dir": str(tmp_path)}, environ={"CACHEFS_CONCURRENCY": "8"}
    )
    assert not config.origin_limit.adaptive
    config = load_config(
        overrides={"cache_dir": str(tmp_path), "concurrency": 8},
        environ={"CACHEFS_ORIGIN_LIMIT__ADAPTIVE": "true"},
    )
    assert config.origin_limit.adaptive and config.concurrency == 8
    config = load_config(
        overrides={"cache_dir": str(tmp_path)},
        environ={"CACHEFS_ORIGIN_LIMIT__ADAPTIVE": "false", "CACHEFS_ORIGIN_LIMIT__HOLD": "5"},
    )
    assert not config.origin_limit.adaptive and config.origin_limit.hold == 5.0
    bad = [
        ({"adaptive": "yes"}, "CACHEFS_ORIGIN_LIMIT__ADAPTIVE"),
        ({"max": 0}, "CACHEFS_ORIGIN_LIMIT__MAX"),
        ({"max": 2.5}, "CACHEFS_ORIGIN_LIMIT__MAX"),
        ({"hold": -1}, "CACHEFS_ORIGIN_LIMIT__HOLD"),
    ]
    for section, variable in bad:
        with pytest.raises(ValueError, match=variable):
            load_config(overrides={"cache_dir": str(tmp_path), "origin_limit": section}, environ={})
    with pytest.raises(ValueError, match=r"origin_limit\.floor"):
        load_config(
            overrides={"cache_dir": str(tmp_path), "origin_limit": {"floor": 1}}, environ={}
        )


def test_where_the_limit_starts_and_how_far_it_may_go(
    make_engine: Callable[..., Engine],
) -> None:
    adaptive = make_engine(
        concurrency=8, origin_connections=40, origin_limit={"adaptive": True}
    ).origin.slots
    assert adaptive.adaptive is not None
    assert (adaptive.adaptive.initial, adaptive.adaptive.ceiling) == (8, 40)
    assert adaptive.width() == 8  # no host asked yet
    assert make_engine(origin_limit={"max": 24}).origin.slots.adaptive.ceiling == 24
    assert make_engine(concurrency=8).origin.slots.adaptive is None


# -- through an engine ----------------------------------------------------------------------


class _Jobs:
    def jobs(self) -> list[Any]:
        return []


def _metric(engine: Engine, name: str) -> float:
    for family in NodeCollector(engine, _Jobs(), CallStats()).collect():
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


def test_slow_down_lowers_the_limit_and_the_prefetch_completes(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    block = 64 * 1024
    data = os.urandom(24 * block + 123)
    s3.put("model.bin", data)
    engine = make_engine(
        block_size=block,
        retry={"base_delay": 0.01, "max_delay": 0.05, "throttle_delay": 0.01},
        origin_limit={"hold": 3600},  # no rise after the cut, however slow this machine
    )
    assert _metric(engine, "cachefs_origin_concurrency_limit") == 16
    s3.fail_next(4, 503, key="model.bin")  # SlowDown
    result = engine.prefetch([s3.url("model.bin")])
    assert result.fetched_bytes == len(data)
    assert engine.read(s3.url("model.bin")) == data
    (limit,) = engine.origin.slots.host_limits().values()
    assert limit < 16  # halved at least once, and no rise within the hold
    assert _metric(engine, "cachefs_origin_concurrency_limit") == limit
    assert _metric(engine, "cachefs_origin_limit_cuts_total") >= 1
