"""What the plugin has published, recorded on disk so that a restart can check it.

One JSON file per volume in the state directory (0700, files 0600), written with
write-then-rename. On start the plugin re-checks every record: a target that is
still mounted keeps its pin; a stale one is cleaned up (see ``csi.node``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from cachefs.node.layout import write_file_atomic


@dataclass(frozen=True)
class PublishedVolume:
    volume_id: str
    target_path: str
    source: str  # canonical URL
    holder: str  # the pin's holder in the node: csi:<volume id>
    view: str  # the node's view directory, bind-mounted at target_path
    namespace: str | None = None
    pod: str | None = None
    model: str | None = None  # "<namespace>/<name>" of the CachedModel the volume names
    version: str | None = None  # the model's version it mounts


class VolumeRecords:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)

    def _path(self, volume_id: str) -> Path:
        return self.directory / f"{xxhash.xxh3_64_hexdigest(volume_id.encode())}.json"

    def get(self, volume_id: str) -> PublishedVolume | None:
        try:
            raw = json.loads(self._path(volume_id).read_text())
        except (OSError, ValueError):
            return None
        record = PublishedVolume(**raw)
        return record if record.volume_id == volume_id else None

    def put(self, record: PublishedVolume) -> None:
        path = self._path(record.volume_id)
        write_file_atomic(path, json.dumps(asdict(record), sort_keys=True).encode())
        os.chmod(path, 0o600)

    def delete(self, volume_id: str) -> None:
        self._path(volume_id).unlink(missing_ok=True)

    def all(self) -> list[PublishedVolume]:
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(PublishedVolume(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)  # a torn or foreign file: nothing to keep
        return records
