"""Waiting for the signal that ends a long-running command (the node, the CSI plugin)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("cachefs.signals")


def wait_for_termination() -> str:
    """Block until SIGTERM or SIGINT arrives; the signal's name."""
    received: list[str] = []
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(1.0):  # a timed wait lets the handler run promptly
        pass
    log.info("received %s", received[0])
    return received[0]
