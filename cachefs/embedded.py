"""The engine run in-process when no node daemon is named (embedded mode).

One engine per cache configuration per process: every filesystem instance and CLI
call in the process shares it, so single flight and quotas hold across them. A
forked child (DataLoader workers) builds its own on first use.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from node.config import load_config
from node.engine import Engine

_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()


def get_engine(
    cache_dir: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Engine:
    """The process's engine for this cache directory / config file."""
    overrides = {"cache_dir": str(cache_dir)} if cache_dir else {}
    environment = {k: v for k, v in os.environ.items() if k.startswith("CACHEFS_")}
    key = (
        os.getpid(),
        json.dumps(
            [str(config or ""), overrides, options or {}, environment], sort_keys=True, default=str
        ),
    )
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine(load_config(config, overrides), options)
            _engines[key] = engine
        return engine
