"""Node labels for data-aware scheduling: ``cachefs.io/<hash of a source>=ready``.

When every object of a source is complete on this node (a prefetch or a view has
finished), the node's Node object gets the source's label; when any of those objects
leaves the cache, the label goes. Pods that want their model local ask for the label
with nodeAffinity; ``cachefs label SOURCE`` prints it. The labels this node set are
recorded in its last tier, so a restarted node keeps the labels whose objects are
still complete and removes the others. API calls run on one background thread, in
order, retried until they succeed: eviction never waits for the API server.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import xxhash

from cachefs.node.layout import write_file_atomic
from cachefs.urls import canonical_source

log = logging.getLogger("cachefs.labels")

PREFIX = "cachefs.io/"
READY = "ready"
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0  # seconds between tries while the API is away


def label_key(source: str) -> str:
    """The Node label of ``source``: ``cachefs.io/`` + 12 hex chars of its xxh3."""
    return PREFIX + xxhash.xxh3_64_hexdigest(canonical_source(source).encode())[:12]


class LabelAPI(Protocol):
    def get(self) -> dict[str, str]: ...
    def patch(self, labels: dict[str, str | None]) -> None: ...


class SourceLabels:
    """The sources complete here, as labels; fed by the engine and the store."""

    def __init__(self, api: LabelAPI, record: Path, is_complete: Any) -> None:
        """``record``: where the labels set are remembered; ``is_complete(object_id)``."""
        self._api = api
        self._record = record
        self._is_complete = is_complete
        self._sources: dict[str, dict[str, Any]] = {}  # key -> {source, objects}
        self._lock = threading.Lock()
        self._patches: queue.Queue[dict[str, str | None] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cachefs-labels", daemon=True)

    def start(self) -> None:
        """Keep the recorded labels whose objects are complete; remove ours that are not."""
        try:
            recorded = json.loads(self._record.read_text())
        except (OSError, ValueError):
            recorded = {}
        keep = {
            key: entry
            for key, entry in recorded.items()
            if all(self._is_complete(object_id) for object_id in entry.get("objects", ()))
        }
        with self._lock:
            self._sources = keep
            self._save()
        self._thread.start()
        self._patches.put(None)  # reconcile with what the Node carries first

    def stop(self) -> None:
        self._stop.set()
        self._patches.put(None)
        self._thread.join(timeout=10)

    def complete(self, sources: Iterable[str], object_ids: Iterable[str]) -> None:
        """``sources`` are complete here, made of ``object_ids``."""
        ids = sorted(set(object_ids))
        changes: dict[str, str | None] = {}
        with self._lock:
            for source in sources:
                key = label_key(source)
                if key not in self._sources:
                    changes[key] = READY
                self._sources[key] = {"source": canonical_source(source), "objects": ids}
            self._save()
        if changes:
            self._patches.put(changes)

    def removed(self, object_id: str) -> None:
        """An object left the cache: the sources it belonged to are not complete now."""
        changes: dict[str, str | None] = {}
        with self._lock:
            for key, entry in list(self._sources.items()):
                if object_id in entry["objects"]:
                    del self._sources[key]
                    changes[key] = None
            if changes:
                self._save()
        if changes:
            self._patches.put(changes)

    def labels(self) -> dict[str, str]:
        with self._lock:
            return {key: entry["source"] for key, entry in self._sources.items()}

    def _save(self) -> None:
        write_file_atomic(self._record, json.dumps(self._sources, sort_keys=True).encode())

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._patches.get()
            if self._stop.is_set():
                return
            delay = _RETRY_FIRST
            while not self._stop.is_set():
                try:
                    if item is None:
                        self._reconcile()
                    else:
                        self._api.patch(item)
                        log.info("node labels: %s", item)
                    break
                except Exception as exc:  # the API server is away: try again
                    log.warning("cannot update the node's labels (%s); retrying", _brief(exc))
                    self._stop.wait(delay)
                    delay = min(delay * 2, _RETRY_MAX)

    def _reconcile(self) -> None:
        """Make the Node's cachefs.io/ labels exactly the sources recorded complete."""
        current = {k: v for k, v in self._api.get().items() if k.startswith(PREFIX)}
        with self._lock:
            wanted = dict.fromkeys(self._sources, READY)
        changes: dict[str, str | None] = {k: None for k in current if k not in wanted}
        changes.update({k: v for k, v in wanted.items() if current.get(k) != v})
        if changes:
            self._api.patch(changes)
            log.info("node labels: %s", changes)


def _brief(error: BaseException) -> str:
    """An API error without its headers or body (they may carry tokens)."""
    status = getattr(error, "status", None)
    return (
        f"HTTP {status} {getattr(error, 'reason', '')}".strip() if status else type(error).__name__
    )
