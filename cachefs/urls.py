"""Origin URLs: validation, canonical form, and object ids.

The canonical form is what names an object in keys, logs, metadata and errors. It
drops what may carry a secret (userinfo, presigned query strings) and aliases
(``s3a://`` is ``s3://``), so the same bytes get the same key whoever asks and with
whatever credentials. The original URL is kept only for fetching and never printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import xxhash

PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "local": "file"}
HTTP_PROTOCOLS = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Query parameters that sign or authorise a request (S3, GCS, Azure SAS, generic tokens).
_SIGNING_PREFIXES = ("x-amz-", "x-goog-")
_SIGNING_KEYS = frozenset(
    {
        "awsaccesskeyid",
        "signature",
        "expires",
        "googleaccessid",
        "sig",
        "se",
        "sp",
        "sv",
        "sr",
        "st",
        "spr",
        "ss",
        "srt",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
        "token",
        "access_token",
        "x-ms-signature",
        "security-token",
    }
)


@dataclass(frozen=True)
class OriginURL:
    """A validated origin URL.

    ``canonical`` is safe to print and store; ``fetch_url`` may carry credentials
    and is excluded from ``repr``.
    """

    protocol: str
    path: str
    canonical: str
    fetch_url: str = field(repr=False, compare=False)

    def __str__(self) -> str:
        return self.canonical

    @property
    def is_http(self) -> bool:
        return self.protocol in HTTP_PROTOCOLS

    def child(self, path: str) -> OriginURL:
        """The URL of ``path`` (a backend path under this URL's protocol)."""
        if self.is_http:
            return parse_url(path)
        return parse_url(
            f"{self.protocol}://{path.lstrip('/') if self.protocol != 'file' else path}"
        )


# Protocols cachefs knows without asking fsspec (importing it costs a start-up).
_COMMON_PROTOCOLS = frozenset({"s3", "gs", "az", "hf", "http", "https", "file", "memory"})


def known_protocols() -> list[str]:
    import fsspec

    return sorted(set(fsspec.available_protocols()))


def _is_known(protocol: str) -> bool:
    return protocol in _COMMON_PROTOCOLS or protocol in known_protocols()


def _is_signing_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SIGNING_KEYS or lowered.startswith(_SIGNING_PREFIXES)


def _check_segments(url_for_message: str, path: str) -> None:
    for segment in path.split("/"):
        if segment in ("..", "."):
            raise ValueError(
                f"path segment {segment!r} is not allowed in {url_for_message}: "
                "name the object by its full path"
            )


def parse_url(url: str) -> OriginURL:
    """Validate ``url`` and return its canonical form. Raises ValueError."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"not a URL: {url!r}")
    if "\x00" in url:
        raise ValueError("URL contains a NUL byte; remove it")
    if "://" not in url:
        if url.startswith("/") or url.startswith("."):
            url = "file://" + os.path.abspath(url)
        else:
            raise ValueError(
                f"malformed URL {_redacted(url)!r}: expected PROTOCOL://PATH, e.g. s3://bucket/key"
            )
    scheme, rest = url.split("://", 1)
    protocol = PROTOCOL_ALIASES.get(scheme.lower(), scheme.lower())
    if not protocol or not protocol.replace("-", "").replace("+", "").isalnum():
        raise ValueError(f"malformed URL {_redacted(url)!r}: bad protocol {scheme!r}")
    if not _is_known(protocol):
        raise ValueError(
            f"unknown protocol {protocol!r} in {_redacted(url)!r}; known: s3, gs, az, hf, "
            "http, https, file, memory (and any installed fsspec backend)"
        )
    if protocol in HTTP_PROTOCOLS:
        return _parse_http(protocol, url)
    parts = urlsplit(f"{protocol}://{rest}")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if protocol == "file":
        path = os.path.normpath("/" + (host + parts.path).lstrip("/")) if parts.path or host else ""
        if not path or path == "/":
            raise ValueError(f"malformed URL {_redacted(url)!r}: no file path")
        _check_segments(_redacted(url), host + parts.path)
        return OriginURL("file", path, f"file://{path}", url)
    path = (
        (host + parts.path).strip("/")
        if protocol != "memory"
        else "/" + (host + parts.path).strip("/")
    )
    if not path.strip("/"):
        raise ValueError(f"malformed URL {_redacted(url)!r}: no bucket or path")
    _check_segments(_redacted(url), path)
    if parts.query:
        # fsspec backends take some query parameters (e.g. s3 versionId): keep the
        # non-secret ones, sorted, in the key.
        kept = sorted(
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if not _is_signing_key(k)
        )
        if kept:
            path = f"{path}?{urlencode(kept)}"
    return OriginURL(
        protocol,
        path,
        f"{protocol}://{path.lstrip('/')}" if protocol != "memory" else f"memory://{path}",
        url,
    )


def _parse_http(protocol: str, url: str) -> OriginURL:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"malformed URL {_redacted(url)!r}: no host")
    host = parts.hostname.lower()
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"malformed URL {_redacted(url)!r}: bad port") from exc
    netloc = host if port in (None, _DEFAULT_PORTS[protocol]) else f"{host}:{port}"
    if ":" in host:
        netloc = f"[{host}]" + (f":{port}" if port not in (None, _DEFAULT_PORTS[protocol]) else "")
    _check_segments(_redacted(url), parts.path)
    kept = sorted(
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _is_signing_key(k)
    )
    canonical = urlunsplit((protocol, netloc, parts.path or "/", urlencode(kept), ""))
    # Fetch with the URL as given (it may be presigned); never print it.
    fetch = urlunsplit((protocol, parts.netloc, parts.path or "/", parts.query, ""))
    return OriginURL(protocol, canonical, canonical, fetch)


def _redacted(url: str) -> str:
    """The URL without userinfo and query string, for error messages."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


def redact(url: str) -> str:
    """Public form of ``_redacted`` for messages about URLs that failed to parse."""
    return _redacted(url)


def object_id(canonical_url: str, version: str) -> str:
    """Id of one origin object at one version: xxh3-128 of URL and version."""
    return xxhash.xxh3_128_hexdigest(f"{canonical_url}\n{version}".encode())
