"""One table from origin answers to exceptions, as s3fs's ``errors.py`` does for S3.

HTTP statuses (from S3, GCS, Azure or a plain web server) and S3 error codes map to
builtins where one fits, so callers can catch ``FileNotFoundError`` or
``PermissionError`` whatever the backend. ``label`` is always a canonical URL.
"""

from __future__ import annotations

import errno
import re

from cachefs.errors import TransientOriginError, VersionChangedError

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
_CODE = re.compile(rb"<Code>([A-Za-z]+)</Code>")


def error_code(body: bytes) -> str | None:
    """The ``<Code>`` of an S3-style XML error body, if any."""
    match = _CODE.search(body or b"")
    return match.group(1).decode() if match else None


def error_for_status(status: int, label: str, body: bytes = b"", pinned: str = "") -> Exception:
    """The exception for an origin's non-success answer to a request about ``label``."""
    code = error_code(body)
    detail = f"HTTP {status}{' ' + code if code else ''}"
    if status == 404:
        return FileNotFoundError(
            errno.ENOENT, f"no such object at the origin: {label} ({detail}); check the URL"
        )
    if status in (401, 403):
        return PermissionError(
            errno.EACCES,
            f"the origin denied access to {label} ({detail}); check the credentials and "
            "permissions configured for this origin",
        )
    if status == 412:
        return VersionChangedError(label, pinned, detail)
    if status == 416:
        return ValueError(f"range not satisfiable for {label} ({detail})")
    if status in TRANSIENT_STATUSES or code in TRANSIENT_CODES:
        return TransientOriginError(f"{label}: origin answered {detail}")
    return OSError(errno.EIO, f"{label}: origin answered {detail}")
