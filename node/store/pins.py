"""Pins: which holders (jobs, users, CSI volumes) claim which objects.

Each holder's object ids are one JSON file under the last tier's ``v1/pins``
(``{holder, objects}``, named by a hash of the holder), rewritten atomically on
every change, so pins survive restarts. A reverse index (object id -> holders)
answers ``holders`` and ``is_pinned`` without going through every holder: space
accounting asks whenever an object's state changes, and is told (``changed``) when
an object gains its first holder or loses its last, before the file is written, so
its figures hold even when the write fails. Not locked itself: the Store changes it
under its lock, takes a holder's ``record`` there, and writes it (``write_record``)
after letting the lock go: the files live on the last tier, whose disk may hang.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import xxhash

from cachefs.node import layout


class Pins:
    """Holders and the object ids each one pins, both ways round."""

    def __init__(self, directory: Path, changed: Callable[[str], None]) -> None:
        self._directory = directory
        self._changed = changed
        self._by_holder: dict[str, set[str]] = {}
        self._by_object: dict[str, set[str]] = {}
        self._load()

    def _load(self) -> None:
        for path in self._directory.glob("*.json"):
            try:
                record = json.loads(path.read_text())
                self._by_holder[str(record["holder"])] = set(map(str, record["objects"]))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        for holder, ids in self._by_holder.items():
            for object_id in ids:
                self._by_object.setdefault(object_id, set()).add(holder)

    def record(self, holder: str) -> tuple[Path, bytes | None]:
        """The file of ``holder`` and what it must hold now (None: no file)."""
        path = self._directory / f"{xxhash.xxh3_64_hexdigest(holder.encode())}.json"
        ids = self._by_holder.get(holder)
        if not ids:
            return path, None
        return path, json.dumps({"holder": holder, "objects": sorted(ids)}).encode()

    def holders(self, object_id: str) -> list[str]:
        return sorted(self._by_object.get(object_id, ()))

    def is_pinned(self, object_id: str) -> bool:
        return object_id in self._by_object

    def snapshot(self) -> dict[str, list[str]]:
        """Every holder and its object ids, sorted."""
        return {holder: sorted(ids) for holder, ids in self._by_holder.items()}

    def add(self, holder: str, object_id: str) -> bool:
        """Pin ``object_id`` for ``holder``; False if it was pinned by it already."""
        ids = self._by_holder.setdefault(holder, set())
        if object_id in ids:
            return False
        ids.add(object_id)
        holders = self._by_object.setdefault(object_id, set())
        holders.add(holder)
        if len(holders) == 1:
            self._changed(object_id)
        return True

    def remove(self, holder: str, object_ids: Iterable[str] | None = None) -> bool:
        """Release ``holder``'s pins on ``object_ids`` (None: all of them).

        False if ``holder`` pins nothing.
        """
        ids = self._by_holder.get(holder)
        if ids is None:
            return False
        released = set(ids) if object_ids is None else ids.intersection(object_ids)
        ids -= released
        if not ids:
            del self._by_holder[holder]
        for object_id in released:
            holders = self._by_object[object_id]
            holders.discard(holder)
            if not holders:
                del self._by_object[object_id]
                self._changed(object_id)
        return True


def write_record(path: Path, payload: bytes | None) -> None:
    """Write a holder's pin file as ``Pins.record`` gave it (None: remove it)."""
    if payload is None:
        path.unlink(missing_ok=True)
    else:
        layout.write_file_atomic(path, payload)
