"""Deadlines for whole response bodies: a socket whose body is late is shut down.

A per-read timeout cannot catch an origin that drips its body: every read gets a
few bytes in time, and a buffered ``readinto`` waits for its whole buffer. So each
ranged GET registers its socket with a deadline, and one watchdog thread shuts the
socket down when the deadline passes: the blocked read returns at once, and the
reader, seeing ``expired``, reports a slow origin instead of a broken one.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(order=True)
class Watch:
    deadline: float
    serial: int
    sock: socket.socket | None = field(compare=False)
    expired: bool = field(default=False, compare=False)
    done: bool = field(default=False, compare=False)


class Deadlines:
    """The watchdog of one origin client (its thread starts with the first watch)."""

    def __init__(self) -> None:
        self._heap: list[Watch] = []
        self._serial = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, sock: socket.socket | None, deadline: float) -> Iterator[Watch]:
        """Shut ``sock`` down if this block is still running at ``deadline``
        (monotonic); ``Watch.expired`` says whether that happened."""
        entry = Watch(deadline, next(self._serial), sock)
        with self._changed:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="origin-deadlines", daemon=True
                )
                self._thread.start()
            self._changed.notify()
        try:
            yield entry
        finally:
            with self._changed:
                entry.done = True  # dropped from the heap when it comes up
                entry.sock = None

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._heap:
                    self._changed.wait()
                first = self._heap[0]
                wait = first.deadline - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                heapq.heappop(self._heap)
                if first.done or first.sock is None:
                    continue
                first.expired = True
                with contextlib.suppress(OSError):
                    first.sock.shutdown(socket.SHUT_RDWR)
