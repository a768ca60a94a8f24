"""Small helpers shared by test modules."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any


class Background:
    """Runs a call in a thread and keeps its result or exception, so a test can act
    (overwrite an object, release a gate) while the call is blocked."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def outcome(self, timeout: float = 30.0) -> Any:
        """The result, or the exception raised (returned, not raised)."""
        assert self.done.wait(timeout), "background call did not finish"
        return self.error if self.error is not None else self.result

    def join(self, timeout: float = 30.0) -> Any:
        """The result; the call's exception is raised here."""
        assert self.done.wait(timeout), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def interrupt_when_held(argv: list[str], env: dict[str, str], gate: Any) -> tuple[int, str, str]:
    """Run ``argv``, press Ctrl-C (SIGINT) once it holds a request at ``gate``, and
    return (exit status, stdout, stderr); the gate opens only after it exited."""
    child = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A runner started in the background ignores SIGINT, and a child inherits
        # that: Ctrl-C must reach the command as a terminal's would.
        preexec_fn=_default_sigint,
    )
    try:
        gate.wait_held(count=1, timeout=30)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)  # while the request is still held
    finally:
        gate.release()
        child.kill()
    return child.returncode, out, err


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
