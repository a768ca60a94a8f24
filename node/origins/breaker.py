"""A circuit breaker per origin host: fail fast while it is down, probe it again later.

Every request to a host that fails after all its retries in a way that says the host
is down (refused or dropped connections, timeouts, 5xx, throttling) counts; any
answer that shows the host is up (a success, a 404, a 403) resets the count. After
``failures`` such requests in a row the breaker opens: for ``cooldown`` seconds every
new request to that host fails at once with ``BreakerOpenError`` instead of waiting
for its own timeouts and retries. Then one request goes through as a probe (the
others still fail fast): if it succeeds the breaker closes, if it fails the breaker
opens again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from cachefs.errors import OriginUnavailableError


class BreakerOpenError(OriginUnavailableError):
    """A request refused at once: its host's breaker is open."""


@dataclass
class _Host:
    failures: int = 0  # in a row
    open_until: float = 0.0  # monotonic; 0: closed
    probing: bool = False
    last_error: str = ""
    fail_fast: int = 0  # requests refused while open


class Breakers:
    """The breakers of every origin host this node talks to."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()

    def before(self, host: str, label: str) -> None:
        """Let a request to ``host`` go, or refuse it now while the breaker is open."""
        if self._threshold <= 0:
            return  # breakers off
        with self._lock:
            state = self._hosts.get(host)
            if state is None or not state.open_until:
                return
            now = time.monotonic()
            if now >= state.open_until and not state.probing:
                state.probing = True  # this request is the probe
                return
            state.fail_fast += 1
            wait = max(0.0, state.open_until - now)
            raise BreakerOpenError(
                f"{label}: the origin {host} is failing ({state.failures} requests in a row, "
                f"last: {state.last_error}); cachefs fails fast "
                + (f"for {wait:.0f}s more, then probes it again" if wait else "while it probes it")
                + "; check that the origin is reachable"
            )

    def after(self, host: str, failed: BaseException | None) -> None:
        """Record how a request to ``host`` ended, retries and all: ``failed`` is the
        error that says the host is down, or None when it answered."""
        if self._threshold <= 0:
            return
        with self._lock:
            state = self._hosts.setdefault(host, _Host())
            state.probing = False
            if failed is None:
                state.failures = 0
                state.open_until = 0.0
                return
            state.failures += 1
            state.last_error = str(failed) or type(failed).__name__
            if state.failures >= self._threshold or state.open_until:
                state.open_until = time.monotonic() + self._cooldown

    def snapshot(self) -> dict[str, tuple[bool, int]]:
        """Per host: whether its breaker is open now, and the requests refused so far."""
        with self._lock:
            return {host: (bool(s.open_until), s.fail_fast) for host, s in self._hosts.items()}
