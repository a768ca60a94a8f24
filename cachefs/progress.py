"""A one-line progress bar for terminals: bytes, rate, ETA, objects."""

from __future__ import annotations

import time
from typing import TextIO

from cachefs.types import JobStatus
from cachefs.units import format_size

_WIDTH = 28
_INTERVAL = 0.1


class ProgressBar:
    """Redraws at most every 0.1 s; draws nothing when the stream is not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._last = 0.0
        self._drawn = False

    def update(self, progress: JobStatus) -> None:
        now = time.monotonic()
        if not self._enabled or (
            now - self._last < _INTERVAL and progress.bytes_done < progress.bytes_total
        ):
            return
        self._last = now
        total = max(progress.bytes_total, 1)
        filled = int(_WIDTH * progress.bytes_done / total)
        fetched = progress.fetched_bytes + progress.peer_bytes
        rate = fetched / progress.seconds if progress.seconds > 0 else 0.0
        left = progress.bytes_total - progress.bytes_done
        eta = f"{left / rate:.0f}s" if rate > 0 and left > 0 else "-"
        self._stream.write(
            f"\r[{'#' * filled}{'.' * (_WIDTH - filled)}] "
            f"{format_size(progress.bytes_done)} / {format_size(progress.bytes_total)}  "
            f"{format_size(rate)}/s  ETA {eta}  "
            f"{progress.objects_done}/{progress.objects_total} objects\x1b[K"
        )
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
