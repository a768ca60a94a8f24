"""Fast weight loaders: safetensors from cachefs (or local files) into CPU or GPU memory.

```python
from cachefs.loaders import load_safetensors, iter_safetensors, local_model_dir

weights = load_safetensors("cachefs::s3://models/llama-3-8b/", device="cuda")
for name, tensor in iter_safetensors("/models/llama-3-8b", device="cuda:1"):
    ...                                   # each tensor as soon as its bytes have landed
path = local_model_dir("cachefs::s3://models/llama-3-8b/")  # for from_pretrained / vLLM
```

A source is a ``.safetensors`` file, a directory or prefix of shards (the ones its
``model.safetensors.index.json`` names, else every ``*.safetensors``), as a local
path or a URL read through the cache. A cold URL loads while it downloads: the cache
prefetches it in the background and the loader reads each chunk as its blocks
arrive. The loader needs torch (the ``cachefs[torch]`` extra); with local paths it
imports neither gRPC nor the engine. See docs/loaders.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cachefs.loaders.errors import (
    DeviceOutOfMemoryError,
    MissingShardError,
    SafetensorsFormatError,
    UnknownDtypeError,
)
from cachefs.loaders.model_dir import local_model_dir, release_model_dir

if TYPE_CHECKING:
    import os

    import torch

    from cachefs.loaders.pipeline import BufferPool, LoadStats, SafetensorsLoader

__all__ = [
    "BufferPool",
    "DeviceOutOfMemoryError",
    "LoadStats",
    "MissingShardError",
    "SafetensorsFormatError",
    "SafetensorsLoader",
    "UnknownDtypeError",
    "iter_safetensors",
    "load_safetensors",
    "local_model_dir",
    "release_model_dir",
]


def iter_safetensors(
    source: str | os.PathLike[str],
    device: str | int | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    **options: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of ``source``, each as soon as it has landed.

    ``device``: "cpu", "cuda" or "cuda:N". ``dtype``: convert floating-point tensors
    to it (integer and bool tensors keep theirs). Options: ``threads`` (reader
    threads), ``chunk_size`` (bytes per read, default 32 MiB), ``pool_size`` (host
    staging memory, default 256 MiB) or ``pool`` (a ``BufferPool``), ``staged`` (True:
    CPU loads through the staging pool too), ``storage_options`` (the ``cachefs``
    filesystem's, for URLs) or ``filesystem`` (a ``cachefs`` filesystem), ``prefetch``
    (False: no background prefetch of a cold URL), and ``mmap`` (True, CPU only: map
    complete local files copy-on-write instead of reading them, so the tensors share
    the page cache).
    """
    from cachefs.loaders.pipeline import SafetensorsLoader

    return iter(SafetensorsLoader(source, device, dtype, **options))


def load_safetensors(
    source: str | os.PathLike[str],
    device: str | int | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``source`` on ``device``: ``iter_safetensors`` into a dict."""
    return dict(iter_safetensors(source, device, dtype, **options))


def __getattr__(name: str) -> Any:
    # The torch-backed classes load on first use: local_model_dir needs no torch.
    if name in ("BufferPool", "LoadStats", "SafetensorsLoader"):
        from cachefs.loaders import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
