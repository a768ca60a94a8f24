"""How many requests one origin host gets in flight: more while they pay, fewer on push-back.

Object storage serves each connection at a bounded rate after a first-byte delay, so
a prefetch goes faster with more ranged GETs in flight, up to what the origin, the
network or this node's CPU delivers in all. That number differs per origin and over
time, so each host's limit is found by trying, in rounds:

* A round ends once as many reads have completed as the limit allows in flight
  (every place used about once); its rate is the bytes those reads brought over the
  round's busy time. A round in which the requests in flight never reached the
  limit says nothing about it (the demand was lower): nothing changes.
* After a full round the limit rises by half (a trial). The next full round keeps
  the rise if the rate grew by at least half as much as the limit did (each added
  request brought at least half the bytes per second the others averaged), and
  tries the next rise; otherwise the limit goes back and holds for ``hold``
  seconds before trying again. A fast local origin stops at once: more connections
  would only cost CPU.
* Push-back (429, 503 SlowDown, Retry-After, timeouts: any failure a retry is
  for) halves the limit at once. Only a request that started after the last cut
  can cut again, so one overloaded moment halves the limit once, as TCP reduces
  once per window of data. Rises wait ``hold`` seconds after a cut.
* The limit stays between ``floor`` and ``ceiling`` (``origin_limit.max``, at
  most ``origin_connections``).

``HostRequests`` counts one host's requests and reports them to its
``AdaptiveLimit``, whose clock tests inject to feed it rounds. What holds requests
to the limit is the fill pool (``fill_pool.py``): it runs as many fills at once as
the busiest host's limit allows, so a fill waiting for room has not started (a
cancelled prefetch never starts it, a dead peer is not asked by it). A reader that
fills its first block in its own thread is not held back by it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cachefs.errors import OriginUnavailableError, TransientOriginError

RISE = 1.5  # a trial multiplies the limit by this
WORTH = 0.5  # a rise is kept if the rate grew by at least this share of the limit's growth
CUT = 0.5  # push-back multiplies the limit by this
log = logging.getLogger("cachefs.origin")


def is_pushback(exc: BaseException) -> bool:
    """An answer that says the origin is overloaded or slow: any failure worth a retry
    (throttling, 5xx, Retry-After, timeouts, dropped connections)."""
    if isinstance(exc, OriginUnavailableError):
        return False  # raised by our own retry policy or breaker, not by the origin
    return isinstance(exc, TransientOriginError | ConnectionError | TimeoutError)


@dataclass(frozen=True)
class Settings:
    """Where each host's limit starts, how high it may go, how long it holds."""

    initial: int
    ceiling: int
    hold: float
    floor: int = 1

    def new(self, name: str = "") -> AdaptiveLimit:
        return AdaptiveLimit(self.initial, self.floor, self.ceiling, self.hold, name=name)


class AdaptiveLimit:
    """One host's limit on requests in flight, decided from rounds and push-back."""

    def __init__(
        self,
        initial: int,
        floor: int,
        ceiling: int,
        hold: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        """``name``: the host, for the debug log of each change."""
        self.floor, self.ceiling = floor, max(floor, ceiling)
        self.name = name
        self.limit = min(max(initial, self.floor), self.ceiling)
        self.hold = hold
        self.cuts = 0  # push-backs that lowered the limit
        self.clock = clock
        self._trial: tuple[int, float] | None = None  # (limit, rate) before the rise on trial
        self._hold_until = 0.0
        self._cut_at = -math.inf
        self._begin_round(clock())

    def _begin_round(self, now: float) -> None:
        self._round_start, self._round_bytes, self._round_reads = now, 0, 0
        self._round_full = False

    def resumed(self) -> None:
        """A request found the host idle: a round measures busy time only."""
        self._begin_round(self.clock())

    def saturated(self) -> None:
        """A request found the limit reached: this round tests the limit."""
        self._round_full = True

    def completed(self, nbytes: int) -> None:
        """A read brought ``nbytes``; ends the round once ``limit`` reads have."""
        self._round_bytes += nbytes
        self._round_reads += 1
        if self._round_reads < self.limit:
            return
        now = self.clock()
        rate = self._round_bytes / max(now - self._round_start, 1e-6)
        if self._round_full:
            self._decide(rate, now)
        else:
            self._trial = None  # too little demand to judge the limit by
        self._begin_round(now)

    def _decide(self, rate: float, now: float) -> None:
        before = self.limit
        self._judge(rate, now)
        if self.limit != before:
            log.debug(
                "%s: %.0f MB/s at %d requests in flight; limit now %d",
                self.name,
                rate / 1e6,
                before,
                self.limit,
            )

    def _judge(self, rate: float, now: float) -> None:
        if self._trial is not None:
            before, before_rate = self._trial
            grew = rate / before_rate - 1 if before_rate > 0 else math.inf
            if grew < WORTH * (self.limit / before - 1):
                self.limit, self._trial = before, None  # the rise did not pay: back, hold
                self._hold_until = now + self.hold
                return
        elif now < self._hold_until:
            return
        if self.limit >= self.ceiling:
            self._trial = None
            return
        self._trial = (self.limit, rate)
        self.limit = min(self.ceiling, max(self.limit + 1, math.ceil(self.limit * RISE)))

    def pushed_back(self, started: float) -> None:
        """A request that started at ``started`` (this clock) met push-back."""
        if started < self._cut_at:
            return  # it was in flight under the limit already cut
        now = self.clock()
        lowered = max(self.floor, int(self.limit * CUT))
        if lowered < self.limit:
            self.cuts += 1
            log.debug("%s: push-back; limit now %d", self.name, lowered)
        self.limit = lowered
        self._cut_at, self._hold_until, self._trial = now, now + self.hold, None
        self._begin_round(now)


class HostRequests:
    """One host's requests in flight, reported to its ``AdaptiveLimit``. It holds no
    request back: the fill pool's width does (``fill_pool.py``)."""

    def __init__(self, control: AdaptiveLimit) -> None:
        self.control = control
        self._lock = threading.Lock()
        self.in_flight = 0
        self.last_start = -math.inf

    @contextmanager
    def held(self, nbytes: int) -> Iterator[None]:
        """One request; ``nbytes``: what it brings if it succeeds (0 for a stat or a
        listing, which do not count towards a round)."""
        control = self.control
        with self._lock:
            if not self.in_flight:
                control.resumed()
            self.in_flight += 1
            if self.in_flight >= control.limit:
                control.saturated()
            started = self.last_start = control.clock()
        failure: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            with self._lock:
                self.in_flight -= 1
                if failure is None:
                    if nbytes:
                        control.completed(nbytes)
                elif is_pushback(failure):
                    control.pushed_back(started)
