"""Origin URLs: validation, canonical form, and object ids.

The canonical form is what names an object in keys, logs, metadata and errors. It
drops what may carry a secret (presigned query strings) and aliases (``s3a://`` is
``s3://``), so the same bytes get the same key whoever asks and with whatever
credentials. The original URL is kept only for fetching and never printed.

It is also the one normal form every check sees: an HTTP path has its unreserved
characters unescaped and its other escapes in upper case (RFC 3986), and in every
scheme a URL is refused when it carries userinfo, a control character, a ``\\``, an
encoded ``/`` or a dot segment, raw or percent-encoded at any depth, so that a URL
which passes an allow-list as one name can never be fetched as another.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import xxhash

PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "local": "file"}
HTTP_PROTOCOLS = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2}).{0,2}", re.DOTALL)
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"  # RFC 3986 pchar and "/": kept as written
_QUERY_SAFE = _PATH_SAFE + "?"
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_MAX_DECODINGS = 8  # a name encoded deeper than this is refused, not decoded further

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

    ``canonical`` is safe to print and store. ``fetch_url`` is what the origin is
    asked for: for HTTP the same normal form with the query as given, which may be
    presigned, so it is excluded from ``repr``.
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


def _control(char: str) -> str:
    return "a NUL byte" if char == "\x00" else f"a control character (U+{ord(char):04X})"


def _first_control(text: str) -> str | None:
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def _fully_decoded(where: str, segment: str) -> str:
    """``segment`` decoded until nothing changes: what a server that decodes too often sees."""
    try:
        decoded = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(
            f"path segment {segment!r} of {where} escapes bytes that are not UTF-8: "
            "percent-encode the name's UTF-8 bytes"
        ) from None
    for _ in range(_MAX_DECODINGS):
        deeper = unquote(decoded, errors="replace")
        if deeper == decoded:
            return decoded
        decoded = deeper
    raise ValueError(
        f"path segment {segment!r} of {where} is percent-encoded over and over: encode a name once"
    )


def _check_segment(where: str, segment: str, protocol: str) -> None:
    """Refuse a segment that is more than one name, raw or encoded at any depth."""
    decoded = _fully_decoded(where, segment)
    control = _first_control(decoded)
    if control is not None:
        raise ValueError(
            f"path segment {segment!r} of {where} encodes {_control(control)}; remove it"
        )
    if "\\" in decoded:
        raise ValueError(
            f"'\\' (raw or encoded as %5C) is not allowed in the path of {where}: "
            "write '/' between path segments"
        )
    # hf:// names a revision after "@", and huggingface_hub spells refs/pr/1 refs%2Fpr%2F1.
    named = decoded.split("@", 1)[0] if protocol == "hf" else decoded
    if "/" in named:
        raise ValueError(
            f"an encoded '/' (%2F) in path segment {segment!r} is not allowed in {where}: "
            "write '/' between path segments"
        )
    # ";" starts path parameters some servers drop ("..;x" is ".."); NFKC maps look-alike
    # dots (U+FF0E, U+2024) to "." as some servers do.
    dots = unicodedata.normalize("NFKC", decoded).split(";", 1)[0]
    if dots in (".", ".."):
        spelled = "" if segment == dots else f"{segment!r} stands for {dots!r}: "
        raise ValueError(
            f"path segment {spelled}{dots!r} is not allowed in {where}: "
            "name the object by its full path"
        )


def _check_path(where: str, path: str, protocol: str) -> None:
    for segment in path.split("/"):
        if segment:
            _check_segment(where, segment, protocol)


def _check_query(where: str, query: str) -> None:
    control = _first_control(unquote(query, errors="replace"))
    if control is not None:
        raise ValueError(f"the query string of {where} encodes {_control(control)}; remove it")


def _split(url: str, where: str) -> SplitResult:
    """``urlsplit`` with its errors (a bad IPv6 literal, a bad port) said as ours, and
    userinfo refused: credentials never travel in a URL, where logs and keys see them."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"malformed URL {where!r}: {exc}") from None
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError:  # its message quotes the port, which may be a cut-off password
        raise ValueError(f"malformed URL {where!r}: bad port") from None
    if "@" in parts.netloc:
        raise ValueError(
            f"credentials in a URL are not accepted: {where} names a user (user:password@); "
            "put them in the config's origins: storage options for this prefix (an HTTP "
            "origin takes headers: {Authorization: ...}) or in the backend's own environment "
            "(e.g. AWS_ACCESS_KEY_ID), and write the URL without them"
        )
    return parts


def parse_url(url: str) -> OriginURL:
    """Validate ``url`` and return its canonical form. Raises ValueError.

    Every check runs on the normal form, and the normal form is what keys the cache,
    what allow-lists match and what goes to the origin, so no spelling of a URL can
    pass a check as one name and be fetched as another.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"not a URL: {url!r}")
    control = _first_control(url)
    if control is not None:
        raise ValueError(f"URL contains {_control(control)}; remove it")
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
    where = _redacted(url)
    parts = _split(f"{protocol}://{rest}", where)
    _check_query(where, parts.query)
    if protocol in HTTP_PROTOCOLS:
        return _parse_http(protocol, parts, where)
    # Other backends take the path as the key itself (fsspec decodes nothing): it stays
    # as written, and the same refusals apply.
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    _check_path(where, host + parts.path, protocol)
    if protocol == "file":
        path = os.path.normpath("/" + (host + parts.path).lstrip("/")) if parts.path or host else ""
        if not path or path == "/":
            raise ValueError(f"malformed URL {where!r}: no file path")
        return OriginURL("file", path, f"file://{path}", url)
    path = (
        (host + parts.path).strip("/")
        if protocol != "memory"
        else "/" + (host + parts.path).strip("/")
    )
    if not path.strip("/"):
        raise ValueError(f"malformed URL {where!r}: no bucket or path")
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


def _http_host(parts: SplitResult, where: str) -> str:
    """The host in one spelling: lower case, ASCII (IDNA), no trailing dot, IPv6 compressed."""
    host = parts.hostname
    if not host:
        raise ValueError(f"malformed URL {where!r}: no host")
    if "%" in host:
        raise ValueError(
            f"malformed URL {where!r}: the host holds a percent-escape; write the host name "
            "as it is"
        )
    if ":" in host:
        try:
            return f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise ValueError(f"malformed URL {where!r}: bad IPv6 address {host!r}") from None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(
                f"malformed URL {where!r}: the host is not a valid name; write it in its "
                "ASCII form (xn--...)"
            ) from None
    host = host.rstrip(".")
    if not _HOST.fullmatch(host):
        raise ValueError(
            f"malformed URL {where!r}: the host {host!r} may hold only letters, digits, "
            "'-', '_' and '.'"
        )
    return host


def _http_path(where: str, path: str) -> str:
    """RFC 3986's normal form: unreserved characters unescaped, other escapes in upper
    case, characters a request line cannot carry escaped (UTF-8)."""
    bad = _BAD_ESCAPE.search(path)
    if bad is not None:
        raise ValueError(
            f"malformed percent-escape {bad.group()!r} in {where}: '%' starts an escape of "
            "two hex digits; write %25 for a '%' in a name"
        )

    def normal(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return quote(_ESCAPE.sub(normal, path), safe=_PATH_SAFE)


def _parse_http(protocol: str, parts: SplitResult, where: str) -> OriginURL:
    host = _http_host(parts, where)
    port = parts.port
    netloc = host if port in (None, _DEFAULT_PORTS[protocol]) else f"{host}:{port}"
    path = _http_path(where, parts.path or "/")
    _check_path(where, path, protocol)
    kept = sorted(
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _is_signing_key(k)
    )
    canonical = urlunsplit((protocol, netloc, path, urlencode(kept), ""))
    # Fetch the normal form with the query as given (it may be presigned); never print it.
    fetch = urlunsplit((protocol, netloc, path, quote(parts.query, safe=_QUERY_SAFE), ""))
    return OriginURL(protocol, canonical, canonical, fetch)


def _redacted(url: str) -> str:
    """The URL without userinfo and query string, for error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.hostname or ""
    try:
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        pass  # a bad port (or a password cut short by a "/") is not shown
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact(url: str) -> str:
    """Public form of ``_redacted`` for messages about URLs that failed to parse."""
    return _redacted(url)


def object_id(canonical_url: str, version: str) -> str:
    """Id of one origin object at one version: xxh3-128 of URL and version."""
    return xxhash.xxh3_128_hexdigest(f"{canonical_url}\n{version}".encode())


def canonical_source(source: str) -> str:
    """One spelling per source: the canonical URL; a prefix keeps its trailing slash."""
    canonical = parse_url(source).canonical
    return canonical + "/" if source.endswith("/") and not canonical.endswith("/") else canonical
