"""gRPC status <-> Python exception: the one table the node and its clients share.

The node aborts a call with the status code of the table below and names the
exception class in the ``cachefs-error`` trailing metadata; a Python client raises
that class again with the node's message, so ``FileNotFoundError`` or
``VersionChangedError`` mean the same in client mode as in embedded mode. Clients in
other languages get a fitting status code. Failures of the call itself (the node is
down, a deadline passed, the token was refused) become errors that say what to do.
"""

from __future__ import annotations

import errno
from typing import NoReturn

import grpc

from cachefs.errors import (
    CacheDirError,
    CacheError,
    IntegrityError,
    JobCancelledError,
    NodeUnavailableError,
    OriginUnavailableError,
    QuotaExceededError,
    TransientOriginError,
    VersionChangedError,
)

ERROR_KEY = "cachefs-error"
# What gRPC reports when the peer answered with something other than HTTP/2.
_NOT_GRPC = "Failed parsing HTTP/2"

# Most specific first: the first class an exception is an instance of wins.
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (VersionChangedError, grpc.StatusCode.FAILED_PRECONDITION),
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OriginUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (TransientOriginError, grpc.StatusCode.UNAVAILABLE),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (JobCancelledError, grpc.StatusCode.CANCELLED),
    (NodeUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (CacheDirError, grpc.StatusCode.INTERNAL),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (IsADirectoryError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotADirectoryError, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
    (BlockingIOError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)
_BY_NAME: dict[str, type[BaseException]] = {cls.__name__: cls for cls, _ in _TABLE}
_ERRNO = {
    FileNotFoundError: errno.ENOENT,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
    PermissionError: errno.EACCES,
    BlockingIOError: errno.EBUSY,
    TimeoutError: errno.ETIMEDOUT,
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a node answers ``exc`` with."""
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def kind_of(exc: BaseException) -> str:
    """The table's name for ``exc``: the class a client raises again."""
    for cls, _ in _TABLE:
        if isinstance(exc, cls):
            return cls.__name__
    return "InternalError"


def message_of(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc) or type(exc).__name__


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with ``exc``'s status, message and class name."""
    kind = kind_of(exc)
    message = message_of(exc)
    if kind == "InternalError":
        message = f"internal error in the node ({type(exc).__name__}: {message}); see its log"
    context.set_trailing_metadata(((ERROR_KEY, kind),))
    context.abort(status_of(exc), message)
    raise AssertionError("unreachable: context.abort raises")


def rebuild(kind: str, message: str) -> BaseException:
    """The exception a node named ``kind``, carrying its message."""
    cls = _BY_NAME.get(kind)
    if cls is None:
        return OSError(errno.EIO, message)
    if issubclass(cls, CacheError):
        exc = cls.__new__(cls)
        CacheError.__init__(exc, message)
        return exc
    if cls in _ERRNO:
        return cls(_ERRNO[cls], message)
    return cls(message)


def from_rpc_error(error: grpc.RpcError, endpoint: str, timeout: float | None) -> BaseException:
    """The exception a client raises for a failed call to the node at ``endpoint``."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    trailing = dict(error.trailing_metadata() or ()) if isinstance(error, grpc.Call) else {}
    kind = trailing.get(ERROR_KEY)
    if kind:
        return rebuild(str(kind), details)
    if code == grpc.StatusCode.UNAVAILABLE and _NOT_GRPC in details:
        return NodeUnavailableError(
            f"the endpoint {endpoint} answers, but it is not a cachefs node's gRPC port "
            "(it speaks HTTP/1: perhaps the node's metrics port?); point CACHEFS_ENDPOINT "
            "at the node's --address (server.address) or its unix socket"
        )
    if (
        code == grpc.StatusCode.UNAVAILABLE
        and endpoint.startswith("unix://")
        and "Permission denied" in details
    ):
        return PermissionError(
            errno.EACCES,
            f"this process may not connect to the cachefs node's socket {endpoint} "
            f"({details}); run it as a member of the socket's group (the node's "
            "server.socket_group) or with a token",
        )
    if code == grpc.StatusCode.UNAVAILABLE or code == grpc.StatusCode.CANCELLED:
        return NodeUnavailableError(
            f"the cachefs node at {endpoint} is unavailable ({details}); check that "
            "`cachefs node` runs there and that CACHEFS_ENDPOINT names it (a node that "
            "speaks TLS needs CACHEFS_TLS_CA)"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(
            errno.ETIMEDOUT,
            f"the cachefs node at {endpoint} did not finish within the deadline "
            f"({timeout:g}s); raise the client's timeout or check the node's load",
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return PermissionError(
            errno.EACCES,
            f"the cachefs node at {endpoint} refused this client ({details}); set "
            "CACHEFS_TOKEN or CACHEFS_TOKEN_FILE to the node's token",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ValueError(f"the cachefs node at {endpoint} refused the request: {details}")
    return OSError(errno.EIO, f"the cachefs node at {endpoint} failed: {code.name}: {details}")
