"""What the loaders raise: builtins where one fits, each naming the file and tensor.

A malformed or truncated file and an unknown dtype are ``ValueError``s, a shard that
an index names but that does not exist is a ``FileNotFoundError``, and running out of
device (or host) memory is a ``MemoryError``. Every one carries ``file`` (the path
or URL) and, where there is one, ``tensor``.
"""

from __future__ import annotations

import errno


class SafetensorsFormatError(ValueError):
    """A safetensors file (or an index) that cannot be what it claims to be."""

    def __init__(self, file: str, message: str, tensor: str | None = None) -> None:
        where = f"{file}: tensor {tensor!r}" if tensor is not None else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.tensor = tensor


class UnknownDtypeError(SafetensorsFormatError):
    """A tensor whose dtype the loader has no torch type for."""

    def __init__(self, file: str, tensor: str, dtype: str, known: list[str]) -> None:
        super().__init__(
            file,
            f"dtype {dtype!r} is not one this loader knows ({', '.join(known)})",
            tensor,
        )
        self.dtype = dtype


class MissingShardError(FileNotFoundError):
    """``model.safetensors.index.json`` names a shard that is not there."""

    def __init__(self, index: str, shard: str, tensor: str, where: str) -> None:
        super().__init__(
            errno.ENOENT,
            f"{index} puts tensor {tensor!r} in the shard {shard!r}, but there is no {where}",
        )
        self.file = index
        self.shard = shard
        self.tensor = tensor


class DeviceOutOfMemoryError(MemoryError):
    """A tensor (or the pinned staging pool) did not fit in the device's memory."""

    def __init__(
        self, file: str, tensor: str | None, nbytes: int, device: str, allocated: int, detail: str
    ) -> None:
        what = f"tensor {tensor!r}" if tensor is not None else "the staging pool"
        super().__init__(
            f"{file}: {what} ({nbytes} bytes) does not fit in {device} memory after "
            f"{allocated} bytes of this load were allocated there: {detail}"
        )
        self.file = file
        self.tensor = tensor
        self.nbytes = nbytes
        self.device = device
