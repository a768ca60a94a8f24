"""Does lz4 pay for blocks sent between nodes? Ratio and speed on model-like files.

    python bench/lz4_bench.py [--size 64MiB]

Compresses, in 8 MiB blocks, what a model directory holds: float16 and bfloat16
weights (normal-distributed, as trained weights are), int8 weights, a tokenizer
vocabulary (JSON) and a config file. Prints, per kind, the ratio (compressed /
original), compression and decompression speed on one core, and whether lz4 clears
the bar the cluster would need: shrink the block by more than 10%, at a speed above
the link's (a 25 Gbit/s link moves ~3 GB/s; compressing slower than that delays the
block instead of speeding it up).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time

import lz4.frame
import numpy as np

MiB = 1024 * 1024
BLOCK = 8 * MiB
LINK_BYTES_PER_SECOND = 25e9 / 8


def weights(size: int, dtype: str) -> bytes:
    values = np.random.default_rng(7).normal(0.0, 0.02, size // 2).astype(np.float32)
    if dtype == "float16":
        return values.astype(np.float16).tobytes()
    if dtype == "bfloat16":  # the top half of each float32
        return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return np.clip(values * 2000, -127, 127).astype(np.int8).tobytes()[: size // 2] * 2


def tokenizer(size: int) -> bytes:
    rng = random.Random(7)
    vocab: dict[str, int] = {}
    length = 0
    while length < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        token = ("Ġ" if rng.random() < 0.5 else "") + word
        if token not in vocab:
            vocab[token] = len(vocab)
            length += len(token) + 12  # quotes, colon, id, comma, space
    return json.dumps({"model": {"type": "BPE", "vocab": vocab}}).encode()[:size]


def config_file() -> bytes:
    return json.dumps(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "rope_theta": 500000.0,
            "torch_dtype": "bfloat16",
            "vocab_size": 128256,
        },
        indent=2,
    ).encode()


def measure(data: bytes) -> tuple[float, float, float]:
    """(ratio, compress B/s, decompress B/s) over 8 MiB blocks."""
    blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
    started = time.perf_counter()
    packed = [lz4.frame.compress(b) for b in blocks]
    compress = time.perf_counter() - started
    started = time.perf_counter()
    for p in packed:
        lz4.frame.decompress(p)
    decompress = time.perf_counter() - started
    ratio = sum(map(len, packed)) / len(data)
    return ratio, len(data) / compress, len(data) / decompress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="64MiB", help="bytes per weight sample")
    args = parser.parse_args()
    size = int(args.size.removesuffix("MiB")) * MiB
    samples = {
        "float16 weights": weights(size, "float16"),
        "bfloat16 weights": weights(size, "bfloat16"),
        "int8 weights": weights(size, "int8"),
        "tokenizer.json": tokenizer(4 * MiB),
        "config.json": config_file(),
    }
    print(f"{'file':<18} {'size':>10} {'ratio':>6} {'comp MB/s':>10} {'decomp MB/s':>12}  pays?")
    for name, data in samples.items():
        ratio, comp, decomp = measure(data)
        pays = ratio < 0.9 and comp > LINK_BYTES_PER_SECOND
        print(
            f"{name:<18} {len(data):>10} {ratio:>6.2f} {comp / 1e6:>10.0f} {decomp / 1e6:>12.0f}"
            f"  {'yes' if pays else 'no'}"
        )


if __name__ == "__main__":
    main()
