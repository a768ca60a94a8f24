"""Origins: where bytes live. One facade over per-protocol backends.

``Origin.stat`` pins an object to a version; ``Origin.read`` streams a byte range of
that version to a sink, retrying transient failures with backoff and jitter (as
long as the origin's ``Retry-After`` asks, when it does). Every request takes one of
the node's origin slots (``slots.py``: one limit for prefetches, readers and
peer-forwarded fills, and each host's adaptive limit, ``adaptive.py``) and passes
its host's circuit breaker (``breaker.py``: a host that keeps failing is failed
fast, then probed).
Storage options come from the config (per URL prefix) and, in embedded mode, from
the caller; they choose credentials, never cache keys.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from cachefs.errors import OriginUnavailableError
from cachefs.node.config import Config
from cachefs.node.origins.adaptive import Settings
from cachefs.node.origins.breaker import Breakers
from cachefs.node.origins.ranged_http import RangedHTTPClient
from cachefs.node.origins.ref import ObjectRef
from cachefs.node.origins.slots import OriginSlots
from cachefs.node.retry import call_with_retries, is_transient
from cachefs.node.sinks import Sink
from cachefs.urls import OriginURL, parse_url

__all__ = ["ObjectRef", "Origin"]


# Each protocol's extra (pyproject.toml's optional dependencies) and the module it brings.
_EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
    "adl": ("azure", "adlfs"),
    "hf": ("hf", "huggingface_hub"),
    "http": ("http", "aiohttp"),
    "https": ("http", "aiohttp"),
}


class Backend(Protocol):
    def stat(self, url: OriginURL) -> ObjectRef: ...
    def list(self, url: OriginURL) -> list[ObjectRef]: ...
    def read(self, ref: ObjectRef, start: int, end: int, sink: Sink) -> None: ...


class Origin:
    def __init__(
        self,
        config: Config,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        observe: Callable[[str, float, BaseException | None], None] | None = None,
    ) -> None:
        """``options`` maps a protocol to storage options that override the config's.

        ``observe(operation, seconds, error)`` is called after every origin request.
        """
        self._config = config
        self._options = {k: dict(v) for k, v in (options or {}).items()}
        self._backends: dict[tuple[str, str], Backend] = {}
        self._lock = threading.Lock()
        self._client = RangedHTTPClient(
            config.retry.timeout, config.allow_redirects_to, config.retry.min_rate
        )
        self._observe = observe
        self.slots = OriginSlots(config.origin_connections, _adaptive(config))
        self.breakers = Breakers(config.retry.breaker_failures, config.retry.breaker_cooldown)

    def backend(self, url: OriginURL) -> Backend:
        options = self._config.options_for(url.canonical)
        options.update(self._options.get(url.protocol, {}))
        key = (url.protocol, json.dumps(options, sort_keys=True, default=str))
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._make_backend(url.protocol, options)
                self._backends[key] = backend
            return backend

    def _make_backend(self, protocol: str, options: dict[str, Any]) -> Backend:
        # Backends are imported when first used: fsspec itself only for the generic one.
        try:
            if protocol == "s3":
                from cachefs.node.origins.s3 import S3Backend

                return S3Backend(options, self._client)
            if protocol in ("http", "https"):
                from cachefs.node.origins.http import HTTPBackend

                return HTTPBackend(protocol, options, self._client)
            from cachefs.node.origins.generic import FsspecBackend

            return FsspecBackend(protocol, options)
        except ImportError as exc:
            extra, module = _EXTRAS.get(protocol, (None, None))
            missing = exc.name or module or "a package"
            hint = (
                f"pip install 'cachefs[{extra}]'"
                if extra
                else f"install the fsspec implementation of {protocol}://"
            )
            raise ImportError(
                f"the {protocol}:// backend is not installed ({missing} is missing): {hint}",
                name=missing,
            ) from exc

    def _timed(self, operation: str, url: OriginURL, fn: Callable[[], Any], nbytes: int = 0) -> Any:
        """``fn`` as one origin request: past its host's breaker (once per request),
        each attempt in one of the node's slots, retried while transient. ``nbytes``:
        what a read brings, for its host's adaptive limit."""
        host = _host(url)

        def attempt() -> Any:
            with self.slots.held(operation, host, nbytes):
                started = time.perf_counter()
                try:
                    result = fn()
                except BaseException as exc:
                    if self._observe:
                        self._observe(operation, time.perf_counter() - started, exc)
                    raise
            if self._observe:
                self._observe(operation, time.perf_counter() - started, None)
            return result

        self.breakers.before(host, url.canonical)
        try:
            result = call_with_retries(attempt, self._config.retry, url.canonical)
        except BaseException as exc:
            down = isinstance(exc, OriginUnavailableError) or is_transient(exc)
            self.breakers.after(host, exc if down else None)
            raise
        self.breakers.after(host, None)
        return result

    def stat(self, url: str | OriginURL) -> ObjectRef:
        parsed = parse_url(url) if isinstance(url, str) else url
        return self._timed("stat", parsed, lambda: self.backend(parsed).stat(parsed))

    def resolve(self, source: str) -> list[ObjectRef]:
        """A source (an object URL or a prefix) as the objects it names, now."""
        url = parse_url(source)
        if not source.endswith("/"):
            try:
                return [self.stat(url)]
            except (IsADirectoryError, FileNotFoundError):
                pass
        refs = self._timed("list", url, lambda: self.backend(url).list(url))
        if not refs:
            raise FileNotFoundError(
                errno.ENOENT,
                f"nothing at {url}: no object of that name and no objects under it; check the URL",
            )
        return refs

    def read(self, ref: ObjectRef, start: int, end: int, sink: Sink) -> None:
        """Bytes [start, end) of ``ref``'s pinned version, streamed to ``sink``.

        Every attempt starts the sink again (``begin``), so a retry never leaves a
        partial first try behind.
        """
        backend = self.backend(ref.url)

        def attempt() -> None:
            sink.begin()
            backend.read(ref, start, end, sink)

        self._timed("read", ref.url, attempt, end - start)

    def ls(self, url: OriginURL) -> list[dict[str, Any]]:
        """The origin's listing under ``url``, retried as a prefix's resolution is."""
        backend = self.backend(url)
        if hasattr(backend, "ls"):
            return self._timed("list", url, lambda: backend.ls(url))
        refs = self._timed("list", url, lambda: backend.list(url))
        return [{"name": r.canonical, "size": r.size, "type": "file"} for r in refs]


def _adaptive(config: Config) -> Settings | None:
    """Each host's adaptive limit, from the config (None: adaptation off)."""
    limit = config.origin_limit
    if not limit.adaptive:
        return None
    ceiling = min(limit.max, config.origin_connections)
    return Settings(min(config.concurrency, ceiling), ceiling, limit.hold)


def _host(url: OriginURL) -> str:
    """What one breaker covers: an HTTP origin's scheme and host, a bucket (S3, GCS,
    Azure, the hub's repository owner) for the others."""
    if url.is_http:
        parts = urlsplit(url.canonical)
        return f"{parts.scheme}://{parts.netloc}"
    return f"{url.protocol}://{url.path.lstrip('/').split('/', 1)[0]}"
