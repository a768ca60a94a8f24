"""One table from origin answers to exceptions, as s3fs's ``errors.py`` does for S3.

HTTP statuses (from S3, GCS, Azure or a plain web server) and S3 error codes map to
builtins where one fits, so callers can catch ``FileNotFoundError`` or
``PermissionError`` whatever the backend. ``label`` is always a canonical URL.
Credentials that are missing or refused are final (a retry cannot find them), and
their messages say whose they are: the process that reads the origin, which is the
node when a client names one, never the client. No message holds a credential.
"""

from __future__ import annotations

import email.utils
import errno
import re
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

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
# 403 codes that mean the credentials themselves were refused, not the permissions.
REFUSED_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
# Whose credentials an origin sees: the same words in embedded mode and in a node.
READER = "the process that reads the origin (the cachefs node, when a client names an endpoint)"
WHERE_CREDENTIALS_GO = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role in its "
    "environment (a node on Kubernetes: the chart's origins.envFromSecret), or key and "
    "secret in the config's origins: options"
)
# errno values backends (s3fs's error table among them) use for answers worth retrying.
TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET})
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


def missing_credentials(label: str, detail: str = "") -> PermissionError:
    """The error for a request cachefs could not sign: final, so it is never retried.

    ``detail`` names what is missing (a variable or a profile), never a value."""
    return PermissionError(
        errno.EACCES,
        f"no AWS credentials for {label}: {detail or 'none were found'} in {READER}; "
        + WHERE_CREDENTIALS_GO,
    )


def _bucket(label: str) -> str:
    parts = urlsplit(label)
    if parts.scheme in ("s3", "s3a") and parts.netloc:
        return parts.netloc
    return parts.path.lstrip("/").split("/", 1)[0] or parts.netloc


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
    if status == 404 and code == "NoSuchBucket":
        return FileNotFoundError(
            errno.ENOENT,
            f"no such bucket at the origin: {_bucket(label)} (for {label}, {detail}); check "
            "the URL (its bucket name) and the endpoint the origin is read at",
        )
    if status == 404:
        return FileNotFoundError(
            errno.ENOENT, f"no such object at the origin: {label} ({detail}); check the URL"
        )
    if status in (401, 403) and code in REFUSED_CREDENTIAL_CODES:
        return PermissionError(
            errno.EACCES,
            f"the origin refused the AWS credentials used for {label} ({detail}): an unknown "
            f"key, a wrong secret or an expired token in {READER}; fix them there",
        )
    if status in (401, 403):
        return PermissionError(
            errno.EACCES,
            f"the origin denied access to {label} ({detail}); check the credentials and "
            f"permissions of {READER}",
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


def origin_error(exc: OSError, label: str) -> OSError:
    """A backend's bare error ("Access Denied", "Service Unavailable") as one that names
    the URL and what to do; transient kinds become TransientOriginError, which the
    origin layer retries."""
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(
            errno.ENOENT, f"no such object at the origin: {label}; check the URL"
        )
    if isinstance(exc, PermissionError):
        return PermissionError(
            errno.EACCES,
            f"the origin denied access to {label}; check the credentials and permissions "
            f"of {READER}",
        )
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in TRANSIENT_ERRNOS or isinstance(exc, ConnectionError | TimeoutError):
        return TransientOriginError(f"{label}: origin answered {reason}")
    return OSError(exc.errno or errno.EIO, f"{label}: origin answered {reason}")
