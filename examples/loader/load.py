"""Load a model's safetensors weights through cachefs.

    CACHEFS_ENDPOINT=unix:///run/cachefs/cachefs.sock \\
        python load.py --framework pt --device cuda s3://models/llama-3-8b/

Every ``*.safetensors`` file under the source is opened as ``cachefs::<url>``: the
node on ``CACHEFS_ENDPOINT`` fetches what it lacks (from its peers, else the origin,
with its own credentials) and hands back a verified local file. Where this pod sees
the node's cache at the same path (``job.yaml`` mounts it), safetensors maps that
file directly: no byte crosses gRPC. Without ``CACHEFS_ENDPOINT`` the same code runs
the cache in-process (a laptop). Prints one JSON line: tensors, bytes, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import fsspec
from safetensors import safe_open


def weight_files(source: str) -> list[str]:
    """Names of the safetensors files under ``source`` (a URL ending in / or one file)."""
    fs, root = fsspec.url_to_fs(f"cachefs::{source}")
    if not source.endswith("/"):
        return [root]
    pending, files = [root], []
    while pending:  # the origin's listing, one level at a time
        for entry in fs.ls(pending.pop(), detail=True):
            if entry["type"] == "directory":
                pending.append(entry["name"])
            elif entry["name"].endswith(".safetensors"):
                files.append(entry["name"])
    return sorted(files)


def load(source: str, framework: str = "pt", device: str = "cpu") -> dict[str, Any]:
    """Every tensor of every safetensors file under ``source``, by name."""
    fs, _ = fsspec.url_to_fs(f"cachefs::{source}")
    names = weight_files(source)
    if not names:
        raise FileNotFoundError(f"no .safetensors file under {source}")
    tensors: dict[str, Any] = {}
    for name in names:
        path = fs.open_local(name)  # complete and verified; a plain file on this host
        with safe_open(path, framework=framework, device=device) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a URL, or a prefix ending in / (s3://models/llama-3-8b/)")
    parser.add_argument("--framework", default="pt", help="pt (torch), numpy, flax, ...")
    parser.add_argument("--device", default="cpu", help="where tensors go (pt: cpu, cuda, cuda:1)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        tensors = load(args.source, args.framework, args.device)
    except (OSError, ValueError) as exc:
        print(f"load.py: {exc}", file=sys.stderr)
        return 1
    summary = {
        "source": args.source,
        "tensors": len(tensors),
        "bytes": sum(int(t.nbytes) for t in tensors.values()),
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
