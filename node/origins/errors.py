"""One table from origin answers to exceptions, as s3fs's ``errors.py`` does for S3.

HTTP statuses (from S3, GCS, Azure or a plain web server) and S3 error codes map to
builtins where one fits, so callers can catch ``FileNotFoundError`` or
``PermissionError`` whatever the backend. ``label`` is always a canonical URL.
"""

from __future__ import annotations

import email.utils
import errno
import re
import time
from collections.abc import Mapping

from cachefs.errors import TransientOriginError, VersionChangedError

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException"})
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


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The seconds an answer's ``Retry-After`` asks to wait (RFC 9110 10.2.3: a number
    of seconds or an HTTP-date); None without one or when it cannot be read."""
    value = (headers or {}).get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(
    status: int,
    label: str,
    body: bytes = b"",
    pinned: str = "",
    headers: Mapping[str, str] | None = None,
) -> Exception:
    """The exception for an origin's non-success answer to a request about ``label``;
    ``headers`` (lower-case names) may carry the ``Retry-After`` of a transient one."""
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
        wait = retry_after(headers)
        return TransientOriginError(
            f"{label}: origin answered {detail}"
            + (f" and asked to retry after {wait:.0f}s" if wait is not None else ""),
            retry_after=wait,
            throttled=status == 429 or code in THROTTLE_CODES,
        )
    return OSError(errno.EIO, f"{label}: origin answered {detail}")
