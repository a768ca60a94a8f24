"""The engine's fill pool, as wide as the origins' adaptive limits allow now.

A prefetch queues every block on the pool at once. With a fixed pool, its thread
count is how many fills run at a time. With adaptive limits (``adaptive.py``) that
number changes while the prefetch runs, so this pool keeps its own queue and hands
a task to a thread only while fewer than ``width()`` run. A queued task has not
begun: its prefetch's stop flag is looked at when it starts, and ``cancel`` works
on it, as on a fixed pool. The threads are made as needed, up to the most any host
may reach; threads reuse their keep-alive connections, so a pool that runs 24 at
once keeps about 24 connections, not one per thread it might have.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


class FillPool(ThreadPoolExecutor):
    """A thread pool that runs at most ``width()`` tasks at once (read anew each time
    one is queued or ends, so the width may change under it)."""

    def __init__(self, threads: int, width: Callable[[], int], thread_name_prefix: str) -> None:
        super().__init__(threads, thread_name_prefix=thread_name_prefix)
        self._width = width
        self._changed = threading.Condition()
        self._queue: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._closed = False
        self.running = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append((future, partial(fn, *args, **kwargs)))
        self._start_queued()
        return future

    def _start_queued(self) -> None:
        """Hand queued tasks to threads while there is room."""
        while True:
            with self._changed:
                if not self._queue or self.running >= self._width():
                    self._changed.notify_all()  # for shutdown, waiting for the queue
                    return
                future, work = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                self.running += 1
            super().submit(self._run, future, work)

    def _run(self, future: Future[Any], work: Callable[[], Any]) -> None:
        try:
            result = work()
        except BaseException as exc:
            outcome: tuple[bool, Any] = (False, exc)
        else:
            outcome = (True, result)
        with self._changed:
            self.running -= 1
        self._start_queued()  # before the waiter wakes: the next fill is on its way
        if outcome[0]:
            future.set_result(outcome[1])
        else:
            future.set_exception(outcome[1])

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._changed:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            elif wait:
                self._changed.wait_for(lambda: not self._queue)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
