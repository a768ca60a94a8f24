"""Asking other nodes for a block, before the origin.

For a block this node lacks: if another node owns it, ask the owner (it fills from
the origin once, however many nodes ask) and, should it fail or time out, the
next-ranked node. If this node owns it (or fills it for a peer), ask the next-ranked
nodes' caches only: when a node joins, the previous owner of a block is exactly its
next-ranked node. A peer's bytes are hashed as they arrive and stored only when
they match the checksum the owner sent. A failing peer is avoided for ``backoff``
seconds. Fills asked by a peer go one hop at most: no request chains between nodes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import xxhash

from cachefs.auth import METADATA_KEY, SCHEME
from cachefs.client import NodeClient
from cachefs.errors import OriginUnavailableError, TransientOriginError
from cachefs.node.cluster.block_wire import CHECKSUM_HEADER, PATH, block_query
from cachefs.node.cluster.hashing import block_key, rank
from cachefs.node.cluster.membership import Membership
from cachefs.node.layout import ObjectHeader
from cachefs.node.origins import ObjectRef
from cachefs.node.origins.ranged_http import RangedHTTPClient
from cachefs.node.sinks import HashingSink, Sink
from cachefs.node.stats import LatencyHistogram
from cachefs.rpc_errors import ERROR_KEY, rebuild

log = logging.getLogger("cachefs.peers")
T = TypeVar("T")
FALLBACKS = 2  # next-ranked nodes whose caches an owner asks before the origin


class PeerDataError(Exception):
    """A peer sent bytes that do not match what it announced."""


class PeerUnreachableError(ConnectionError):
    """The peer itself failed (not its origin): refused, reset, silent or no endpoint."""


class _PeerAnswered(Exception):
    """A peer answered a block request with an error; ``error`` is what it raised."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _answered(status: int, headers: dict[str, str], body: bytes) -> Exception:
    """The exception a peer's error answer stands for (the class it names, rebuilt)."""
    kind = headers.get(ERROR_KEY) or ("PermissionError" if status in (401, 403) else "")
    message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return _PeerAnswered(rebuild(kind, message))


class _Checked:
    """A sink that hashes what passes through it (the peer's checksum is checked
    before the block counts)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.hasher = xxhash.xxh3_64()

    def begin(self) -> None:
        self.hasher.reset()
        self.sink.begin()

    def write(self, chunk: memoryview) -> None:
        self.hasher.update(chunk)
        self.sink.write(chunk)

    def xxh3(self) -> int:
        return self.hasher.intdigest()


@dataclass
class PeerStats:
    """Per peer: blocks fetched, errors by kind, latency of a whole block."""

    blocks: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fetched(self, peer: str, seconds: float) -> None:
        with self.lock:
            self.blocks[peer] += 1
            self.latency.setdefault(peer, LatencyHistogram()).observe(seconds)

    def failed(self, peer: str, kind: str) -> None:
        with self.lock:
            self.errors[(peer, kind)] += 1


class Peers:
    def __init__(
        self,
        membership: Membership,
        self_address: str,
        timeout: float = 30.0,
        backoff: float = 30.0,
        token: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        self.membership = membership
        self.self_address = self_address
        self.timeout = timeout
        self.backoff = backoff
        self.stats = PeerStats()
        self._token, self._tls_ca = token, tls_ca
        self._headers = {METADATA_KEY.title(): f"{SCHEME}{token}"} if token else {}
        self._http = RangedHTTPClient(
            timeout=timeout,
            ssl_context=ssl.create_default_context(cafile=tls_ca) if tls_ca else None,
        )
        self._block_ports: dict[str, int] = {}
        self._clients: dict[str, NodeClient] = {}
        self._avoid_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def client(self, peer: str) -> NodeClient:
        with self._lock:
            client = self._clients.get(peer)
            if client is None:
                # No waiting for a peer that went away: peer_timeout and the back-off
                # decide, and the origin is the next source.
                client = NodeClient(
                    peer, self.timeout, self._token or "", self._tls_ca or "", "", reconnect_grace=0
                )
                self._clients[peer] = client
            return client

    def others(self) -> list[str]:
        return [m for m in self.membership.members() if m != self.self_address]

    def fill_order(self, items: Sequence[T], key: Callable[[T], tuple[str, int]]) -> list[T]:
        """A prefetch's blocks in the order this node should fill them: those it owns
        first (the fills the other nodes will wait for), then the rest from an offset
        of its own, so that the nodes do not all ask the same few owners at once."""
        members = list(self.membership.members())
        if self.self_address not in members:
            members.append(self.self_address)
        if len(members) < 2:
            return list(items)
        own: list[T] = []
        others: list[T] = []
        for item in items:
            owner = rank(block_key(*key(item)), members)[0]
            (own if owner == self.self_address else others).append(item)
        if others:
            shift = xxhash.xxh3_64_intdigest(self.self_address.encode()) % len(others)
            others = others[shift:] + others[:shift]
        return own + others

    def plan(self, key: str, forwarded: bool) -> list[tuple[str, bool]]:
        """(peer, cached_only) to ask, in order, for block ``key``."""
        members = list(self.membership.members())
        if self.self_address not in members:
            members.append(self.self_address)
        if len(members) < 2:
            return []
        ranked = rank(key, members)
        if forwarded or ranked[0] == self.self_address:
            fallbacks = [m for m in ranked[1:] if m != self.self_address][:FALLBACKS]
            return [(peer, True) for peer in fallbacks]
        owners = [m for m in ranked[:2] if m != self.self_address]
        return [(peer, False) for peer in owners]

    def fill(
        self, ref: ObjectRef, header: ObjectHeader, index: int, sink: Sink, forwarded: bool
    ) -> str | None:
        """Fill block ``index`` into ``sink`` from a peer: the peer, or None (use the origin)."""
        for peer, cached_only in self.plan(block_key(ref.id, index), forwarded):
            if self._avoided(peer):
                continue
            started = time.monotonic()
            try:
                if self._fetch(peer, ref, header, index, sink, cached_only):
                    self.stats.fetched(peer, time.monotonic() - started)
                    return peer
            except FileNotFoundError:
                continue  # not cached there (cached_only), or the object is gone
            except (OriginUnavailableError, TransientOriginError) as exc:
                # The peer is fine; its origin is not (its breaker may be open): no
                # back-off for the peer, and this node's own origin request decides.
                log.info("peer %s could not fill block %d: %s", peer, index, exc)
                continue
            except Exception as exc:
                kind = type(exc).__name__
                self.stats.failed(peer, kind)
                log.warning(
                    "peer %s failed block %d of %s (%s: %s); avoiding it for %ds",
                    peer,
                    index,
                    ref.canonical,
                    kind,
                    exc,
                    self.backoff,
                )
                with self._lock:
                    self._avoid_until[peer] = time.monotonic() + self.backoff
        return None

    def avoided(self) -> set[str]:
        """The peers being avoided now (their back-off has not ended)."""
        now = time.monotonic()
        with self._lock:
            return {peer for peer, until in self._avoid_until.items() if now < until}

    def _avoided(self, peer: str) -> bool:
        with self._lock:
            until = self._avoid_until.get(peer)
            if until is not None and time.monotonic() >= until:
                del self._avoid_until[peer]
                return False
            return until is not None

    def _fetch(
        self,
        peer: str,
        ref: ObjectRef,
        header: ObjectHeader,
        index: int,
        sink: Sink,
        cached_only: bool,
    ) -> bool:
        """Block ``index`` from ``peer``'s block endpoint into ``sink``, as an origin
        read is (see block_server): checked against the checksum the peer recorded."""
        start, end = header.block_span(index)
        query = block_query(
            ref.url.fetch_url,
            ref.version,
            ref.size,
            ref.etag or "",
            header.block_size,
            fill=not cached_only,
            forwarded=not cached_only,
        )
        checked = sink if isinstance(sink, HashingSink) else _Checked(sink)
        label = f"block {index} of {ref.canonical} from peer {peer}"
        try:
            answer = self._http.get_range(
                f"{self._block_url(peer)}{PATH}?{query}",
                start,
                end,
                checked,
                label,
                headers=self._headers,
                errors=_answered,
            )
        except _PeerAnswered as answered:  # the peer's own error: what it means
            raise answered.error from None
        except (OSError, TransientOriginError) as exc:  # the peer, not its origin
            with self._lock:
                self._block_ports.pop(peer, None)  # it may have restarted elsewhere
            raise PeerUnreachableError(f"{label}: {exc}") from exc
        announced = answer.headers.get(CHECKSUM_HEADER, "")
        try:
            expected = int(announced, 16)
        except ValueError:
            raise PeerDataError(f"announced no checksum ({announced[:20]!r})") from None
        if checked.xxh3() != expected:
            raise PeerDataError("sent bytes whose checksum does not match; discarded")
        return True

    def _block_url(self, peer: str) -> str:
        """``scheme://host:port`` of ``peer``'s block endpoint (its port learned once,
        from its Status)."""
        with self._lock:
            port = self._block_ports.get(peer)
        if port is None:
            port = self.client(peer).status().block_port
            if not port:
                raise PeerUnreachableError(f"peer {peer} serves no blocks (no block_port)")
            with self._lock:
                self._block_ports[peer] = port
        host = peer.rpartition(":")[0]
        return f"{'https' if self._tls_ca else 'http'}://{host}:{port}"

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()
