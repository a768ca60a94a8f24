"""Views: a holder's source as a directory of hard links under origin names.

A view is what a CSI volume bind-mounts read-only, so an inference server reads
``/models/config.json`` unchanged. The node builds one per holder from the holder's
manifest: every object is pinned by the holder, complete and verified (each block,
and the whole against the origin's digest) before its link is made, and the view is
built in a staging directory and renamed into place, so a reader never sees half a
view. Links share the data files' inodes, which the store never rewrites, and the
holder's pin keeps them from eviction.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cachefs.errors import QuotaExceededError
from cachefs.node import layout
from cachefs.node.engine import Engine, Manifest
from cachefs.urls import parse_url

_RECORD = ".view.json"


@dataclass(frozen=True)
class View:
    path: Path
    objects: int
    bytes: int


def view_name(holder: str) -> str:
    """A directory name for ``holder``: readable, and unique through a hash suffix."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", holder).strip("-.")[:64] or "holder"
    return f"{readable}-{xxhash.xxh3_64_hexdigest(holder.encode())[:12]}"


def names_in_view(manifest: Manifest) -> dict[str, str]:
    """Object id -> path inside the view: relative to its prefix, or its base name."""
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for source in manifest.sources:
        url = parse_url(source)
        prefix = url.canonical.rstrip("/") + "/" if source.endswith("/") else None
        for ref in manifest.objects:
            if ref.id in names:
                continue
            if prefix is not None and ref.canonical.startswith(prefix):
                name = ref.canonical[len(prefix) :]
            elif ref.canonical == url.canonical:
                name = ref.canonical.rsplit("/", 1)[-1]
            else:
                continue
            _check_name(name, ref.canonical)
            if name in taken:
                raise ValueError(
                    f"{ref.canonical} and {taken[name]} would both be {name!r} in the view; "
                    "name sources whose files do not collide"
                )
            names[ref.id], taken[name] = name, ref.canonical
    return names


def _check_name(name: str, url: str) -> None:
    """A view path must stay inside the view: relative, no empty, . or .. parts."""
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{url} gives the path {name!r}, which cannot be placed in a view")


class Views:
    """The node's views, one per holder, in the tier that holds its objects."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()

    def build(
        self,
        holder: str,
        sources: Sequence[str],
        tier: str | None = None,
        manifest: Manifest | None = None,
    ) -> View:
        """Pin and complete ``sources`` for ``holder``, and return its view (built once).
        ``manifest``: exactly these versions (a CachedModel's), not a fresh resolve."""
        engine = self._engine
        manifest = manifest or engine.resolve(sources)
        engine.prefetch_manifest(manifest, pin=holder, tier=tier)
        names = names_in_view(manifest)
        objects = []
        for ref in manifest.objects:
            obj = engine.store.get(ref.id)
            path = engine.store.local_path(obj) if obj is not None else None
            if obj is None or path is None:
                raise QuotaExceededError(
                    f"{ref.canonical} left the cache while its view was built; try again"
                )
            objects.append((names[ref.id], obj, path))
        tiers = {obj.tier.name for _, obj, _ in objects}
        if len(tiers) > 1:
            raise ValueError(
                f"the objects of {', '.join(sources)} lie in several tiers "
                f"({', '.join(sorted(tiers))}) and a view links files of one file system; "
                "name one tier for them"
            )
        root = objects[0][1].tier.root if objects else engine.store.tiers[-1].root
        record = {"holder": holder, "objects": {name: obj.id for name, obj, _ in objects}}
        with self._lock:
            target = layout.views_dir(root) / view_name(holder)
            if _read_record(target) == record:
                return View(target, len(objects), manifest.size)
            self._remove_everywhere(holder)
            staging = layout.views_dir(root) / f".staging-{uuid.uuid4().hex}"
            try:
                layout.make_parents(staging / "view")  # staging itself, 0755 whatever the umask
                for name, _, path in objects:
                    link = staging / name
                    if not link.resolve().is_relative_to(staging.resolve()):
                        raise ValueError(f"{name!r} would leave the view")
                    layout.make_parents(link)
                    os.link(path, link)
                (staging / _RECORD).write_text(json.dumps(record, sort_keys=True))
                os.rename(staging, target)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                # Another process on this cache directory (embedded mode) built the
                # same view first: theirs serves.
                raced = exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
                if not raced or _read_record(target) != record:
                    raise
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return View(target, len(objects), manifest.size)

    def remove(self, holder: str) -> bool:
        """Remove ``holder``'s view (a mount of it keeps its files); True if there was one."""
        with self._lock:
            return self._remove_everywhere(holder)

    def _remove_everywhere(self, holder: str) -> bool:
        removed = False
        for tier in self._engine.store.tiers:
            target = layout.views_dir(tier.root) / view_name(holder)
            if target.exists():
                retired = layout.trash_dir(tier.root) / f"view-{uuid.uuid4().hex}"
                os.rename(target, retired)
                shutil.rmtree(retired, ignore_errors=True)
                removed = True
        return removed


def _read_record(target: Path) -> object:
    try:
        return json.loads((target / _RECORD).read_text())
    except (OSError, ValueError):
        return None
