"""Plain HTTP(S) origins: HEAD for metadata, ranged GETs for bytes.

The version is the strong ETag when the server sends one (then each GET carries
If-Match), else size + Last-Modified. Every answer's ETag, Last-Modified and total
size are compared with the pinned ones too, for servers that ignore If-Match. The
HEAD's ``Repr-Digest`` (or a model hub's ``X-Linked-Etag``) is the object's digest.
Listing a "directory" URL (ending in /) uses fsspec's HTTP filesystem, which reads
the links of an index page: at the URL this module's own client was redirected to
(redirects checked as every other request's are), with aiohttp's redirects off.
"""

from __future__ import annotations

import errno
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from cachefs.errors import VersionChangedError
from cachefs.node.origins.digests import http_digest
from cachefs.node.origins.errors import error_for_status
from cachefs.node.origins.ranged_http import Answer, RangedHTTPClient
from cachefs.node.origins.ref import ObjectRef
from cachefs.node.sinks import BufferSink, Sink
from cachefs.urls import OriginURL, parse_url


class HTTPBackend:
    def __init__(self, protocol: str, options: dict[str, Any], client: RangedHTTPClient) -> None:
        self.protocol = protocol
        self._options = options
        self._headers = dict(options.get("headers") or {})
        self._client = client

    def stat(self, url: OriginURL) -> ObjectRef:
        answer = self._client.head(url.fetch_url, label=url.canonical, headers=self._headers)
        if answer.status == 405:  # HEAD not allowed: ask for the first byte instead
            answer = self._client.get_range(
                url.fetch_url, 0, 1, BufferSink(1), url.canonical, self._headers
            )
        location = answer.headers.get("location", "") if 300 <= answer.status < 400 else ""
        if location and urlsplit(location).path.rstrip("/") == urlsplit(url.canonical).path:
            raise IsADirectoryError(errno.EISDIR, f"{url} is a directory; name an object in it")
        if answer.status >= 300:
            raise error_for_status(answer.status, url.canonical, headers=answer.headers)
        size = _total_size(answer)
        if size is None:
            raise OSError(
                errno.EIO,
                f"{url} does not report its size (no Content-Length); cachefs needs it",
            )
        etag = answer.headers.get("etag")
        return ObjectRef(
            url=url,
            version=_version(answer, size),
            size=size,
            etag=etag if etag and not etag.startswith("W/") else None,
            digest=http_digest(answer),
        )

    def list(self, url: OriginURL) -> list[ObjectRef]:
        import fsspec

        # The query goes to aiohttp as params, never into URLs that fsspec logs.
        parts = urlsplit(self._client.locate(url.fetch_url, url.canonical, self._headers))
        options = {**self._options, "allow_redirects": False}
        if parts.query:
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            options["params"] = {**query, **(options.get("params") or {})}
        fs = fsspec.filesystem(self.protocol, **options)
        listed = urlunsplit(parts._replace(query=""))
        where = listed.rstrip("/") + "/"
        try:
            found = _files_under(fs, listed, where)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"no such object at the origin: {url}; check the URL"
            ) from None
        # Objects are named under the URL the user gave (each read follows the redirect
        # again).
        named = urlsplit(url.fetch_url)._replace(query="").geturl().rstrip("/") + "/"
        return [self.stat(parse_url(named + found_url[len(where) :])) for found_url in found]

    def read(self, ref: ObjectRef, start: int, end: int, sink: Sink) -> None:
        headers = dict(self._headers)
        if ref.etag:
            headers["If-Match"] = ref.etag
        answer = self._client.get_range(
            ref.url.fetch_url, start, end, sink, ref.canonical, headers, pinned=ref.version
        )
        total = _total_size(answer, ranged=True)
        if total is not None and total != ref.size:
            raise VersionChangedError(ref.canonical, ref.version, f"size is now {total}")
        if _comparable(answer) and _version(answer, ref.size) != ref.version:
            raise VersionChangedError(ref.canonical, ref.version, "the origin's ETag changed")
        if not _comparable(answer):
            current = self.stat(ref.url)
            if current.version != ref.version:
                raise VersionChangedError(ref.canonical, ref.version, f"now {current.version}")


def _files_under(fs: Any, top: str, where: str) -> list[str]:
    """Every file URL below ``where``, read index page by index page from ``top``.

    Each page asked for below the top is a directory URL ending in "/", so none needs
    a redirect (aiohttp's are off). Links outside ``where`` are dropped, among them
    those fsspec takes across to http from an https page.
    """
    files: list[str] = []
    todo, seen = [top], {top}
    while todo:
        for entry in fs.ls(todo.pop(), detail=True):
            name = str(entry["name"])
            if not name.startswith(where) or name in seen:
                continue
            seen.add(name)
            if name.endswith("/"):
                todo.append(name)
            else:
                files.append(name)
    return sorted(files)


def _comparable(answer: Answer) -> bool:
    return "etag" in answer.headers or "last-modified" in answer.headers


def _version(answer: Answer, size: int) -> str:
    etag = answer.headers.get("etag")
    if etag:
        return f"etag:{etag}"
    return f"size:{size}:last-modified:{answer.headers.get('last-modified', '')}"


def _total_size(answer: Answer, ranged: bool = False) -> int | None:
    content_range = answer.headers.get("content-range", "")
    if "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    if ranged:
        return None
    length = answer.headers.get("content-length")
    return int(length) if length and length.isdigit() else None
