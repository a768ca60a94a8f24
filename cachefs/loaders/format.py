"""The safetensors format: an 8-byte little-endian header length, a JSON header,
then the tensors' bytes. Parsed here without torch, and checked as strictly as the
reference implementation: every entry's dtype, shape and offsets must agree, and
every tensor must lie inside the file."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachefs.loaders.errors import SafetensorsFormatError, UnknownDtypeError

# The reference implementation refuses headers above 100 MB.
MAX_HEADER = 100_000_000

# safetensors dtype name -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: where its bytes are, relative to the file's start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    file: str
    size: int  # of the whole file
    data_start: int  # 8 + header length
    tensors: tuple[TensorEntry, ...]  # in file order
    metadata: dict[str, str]


def parse_header(
    file: str, size: int, read: Callable[[int, int], bytes], known: Callable[[str], bool]
) -> Header:
    """The header of ``file`` (``size`` bytes), reading ranges [start, end) with ``read``.

    ``known(dtype)`` says whether the caller can build tensors of that dtype.
    """
    if size < 8:
        raise SafetensorsFormatError(
            file,
            f"{size} bytes, fewer than the 8 of the header length: truncated or not a "
            "safetensors file",
        )
    length = int.from_bytes(read(0, 8), "little")
    if length > MAX_HEADER:
        raise SafetensorsFormatError(
            file,
            f"its header length field says {length} bytes (more than {MAX_HEADER}): not a "
            "safetensors file",
        )
    if 8 + length > size:
        raise SafetensorsFormatError(
            file,
            f"its header is {length} bytes but the file has only {size - 8} after the "
            "length field: truncated",
        )
    raw = read(8, 8 + length)
    if len(raw) != length:
        raise SafetensorsFormatError(file, "the file ended inside the header: truncated")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsFormatError(
            file, f"its header is not valid JSON ({exc}): truncated or not a safetensors file"
        ) from None
    if not isinstance(doc, dict):
        raise SafetensorsFormatError(file, "its header is not a JSON object")
    data_start = 8 + length
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsFormatError(file, "its __metadata__ is not a JSON object")
    entries = [_entry(file, name, value, data_start, size, known) for name, value in doc.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    previous: TensorEntry | None = None
    for entry in entries:
        if previous is not None and entry.begin < previous.end and entry.nbytes:
            raise SafetensorsFormatError(
                file,
                f"its bytes [{entry.begin}, {entry.end}) overlap those of {previous.name!r}",
                entry.name,
            )
        if entry.nbytes:
            previous = entry
    return Header(file, size, data_start, tuple(entries), {str(k): v for k, v in metadata.items()})


def _entry(
    file: str, name: str, value: Any, data_start: int, size: int, known: Callable[[str], bool]
) -> TensorEntry:
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= value.keys():
        raise SafetensorsFormatError(
            file, "its header entry lacks dtype, shape or data_offsets", name
        )
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str):
        raise SafetensorsFormatError(file, f"dtype {dtype!r} is not a string", name)
    if dtype not in DTYPE_SIZES or not known(dtype):
        raise UnknownDtypeError(file, name, dtype, [d for d in DTYPE_SIZES if known(d)])
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise SafetensorsFormatError(
            file, f"shape {shape!r} is not a list of non-negative integers", name
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise SafetensorsFormatError(
            file, f"data_offsets {offsets!r} is not a pair of non-negative integers", name
        )
    begin, end = offsets
    if end < begin:
        raise SafetensorsFormatError(file, f"data_offsets {offsets!r} end before they begin", name)
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SafetensorsFormatError(
            file,
            f"{dtype} {shape} needs {expected} bytes but data_offsets {offsets} span {end - begin}",
            name,
        )
    if data_start + end > size:
        raise SafetensorsFormatError(
            file,
            f"its bytes [{data_start + begin}, {data_start + end}) run past the end of the "
            f"file ({size} bytes): truncated",
            name,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
