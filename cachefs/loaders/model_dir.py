"""A model prefix as a local directory that Hugging Face tooling opens unchanged.

``local_model_dir("cachefs::s3://models/llama-3-8b/")`` prefetches the prefix and
returns a directory whose files carry the origin's names relative to the prefix
(``config.json``, ``model-00001-of-00004.safetensors``, ...), so
``transformers.AutoModel.from_pretrained(path)`` and ``vllm serve path`` read it
as they would a download. It is a *view*: hard links to the cache's verified data
files, made under the cache root (``<tier root>/v1/views/<holder>-<hash>/``) by the
node in client mode (the ``View`` call; the cache root must be mounted at the same
path here) and by the same code in this process in embedded mode. The view's
holder pins its objects, so they are not evicted while it exists; ``release_model_dir``
unpins them and removes the view.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

from cachefs.loaders.sources import client_of, is_url, origin_url


def default_holder(prefix: str) -> str:
    """The holder name a view of ``prefix`` is pinned by unless one is given."""
    return f"loader:{prefix}"


def _prefix(source: str) -> str:
    url = origin_url(source)
    return url if url.endswith("/") else url + "/"


def local_model_dir(
    source: str | os.PathLike[str],
    *,
    holder: str | None = None,
    tier: str | None = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> str:
    """A local directory holding every file under ``source``, under its origin names.

    ``source`` is a ``cachefs::`` URL (or any URL) of a prefix, or a local directory
    (returned as it is). The objects are fetched into the cache first (nothing is
    fetched twice), pinned by ``holder`` (default ``loader:<prefix URL>``), and
    placed in ``tier`` when given. ``storage_options`` are the ``cachefs``
    filesystem's (``endpoint``, ``cache_dir``, ``config``, ...).
    """
    if not is_url(source):
        path = Path(source)
        if not path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, f"{path} is not a directory: give a model directory or prefix"
            )
        return str(path)
    prefix = _prefix(os.fspath(source))
    client = client_of(storage_options, filesystem)
    holder = holder or default_holder(prefix)
    path = client.view(holder, [prefix], tier).path
    if not os.path.isdir(path):
        raise FileNotFoundError(
            errno.ENOENT,
            f"the node built the view of {prefix} at {path}, but that directory is not "
            "visible on this host; mount the node's cache root at the same path",
        )
    return path


def release_model_dir(
    source: str | os.PathLike[str],
    *,
    holder: str | None = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> None:
    """Unpin what ``local_model_dir(source)`` pinned and remove its directory."""
    if not is_url(source):
        return
    prefix = _prefix(os.fspath(source))
    client = client_of(storage_options, filesystem)
    holder = holder or default_holder(prefix)
    with contextlib.suppress(FileNotFoundError):  # nothing pinned (any more)
        client.unpin(holder)  # its view goes with the holder's pins
