"""Errors cachefs raises, as builtins where a builtin fits.

The engine raises them; in client mode the node's errors arrive as the same classes
(``cachefs.rpc_errors``). Callers (the fsspec filesystem, the CLI) catch builtins:
``FileNotFoundError`` for a missing object, ``PermissionError`` for denied access,
``ValueError`` for bad input.
The classes below add what builtins cannot say: an origin object changed under a
pinned read, a quota that cannot hold a pin, an origin that stayed unavailable.
Messages name canonical URLs only, never credentials or signed query strings.
"""

from __future__ import annotations

import errno


class CacheError(OSError):
    """Base class of cachefs-specific errors: an OSError with a fixed errno."""

    code = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)

    def __str__(self) -> str:
        return self.strerror or ""


class VersionChangedError(CacheError):
    """The origin object changed while a reader was pinned to an older version."""

    code = errno.ESTALE

    def __init__(self, url: str, pinned: str, detail: str = "") -> None:
        super().__init__(
            f"{url} changed at the origin while it was being read (pinned version {pinned}"
            f"{'; ' + detail if detail else ''}); open it again to read the new version"
        )
        self.url = url
        self.pinned = pinned
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.url, self.pinned, self.detail)


class QuotaExceededError(CacheError):
    """A pin or an object cannot fit in any tier's quota."""

    code = errno.EDQUOT


class OriginUnavailableError(CacheError, ConnectionError):
    """The origin kept failing with transient errors after every retry."""


class TransientOriginError(CacheError):
    """One origin request failed in a way worth retrying (5xx, throttling, reset).

    ``retry_after``: the seconds the origin asked to wait (``Retry-After``);
    ``throttled``: it said to slow down (429, S3 ``SlowDown``)."""

    code = errno.EAGAIN

    def __init__(
        self, message: str, retry_after: float | None = None, throttled: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.throttled = throttled


class JobCancelledError(CacheError):
    """A prefetch job was cancelled (``cachefs cancel``); what it fetched stays cached."""

    code = errno.ECANCELED


class IntegrityError(CacheError):
    """Bytes did not match their recorded checksum or expected length."""


class CacheDirError(CacheError):
    """The cache directory cannot be created or written, or another owner holds it."""

    code = errno.EACCES


class NodeUnavailableError(CacheError, ConnectionError):
    """The cachefs node a client talks to cannot be reached or went away mid-call."""

    code = errno.ECONNREFUSED
