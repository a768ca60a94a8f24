"""Who the cluster's nodes are: one source of truth, chosen in the config.

A membership source keeps a set of peer addresses (``host:port`` of each node's
gRPC listener, this node's own included) and may change it at any time: nodes come
and go without a restart. ``static`` (here) is a fixed list; ``dns`` re-resolves a
headless Service name (``cachefs.node.cluster.dns``); ``kubernetes`` watches the
Service's EndpointSlices (``cachefs.node.kube``). ``from_config`` picks one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger("cachefs.cluster")


class Membership:
    """The current members; sources call ``_set`` when they learn a new list."""

    def __init__(self) -> None:
        self._members: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[tuple[str, ...]], None]] = []
        self.ready = threading.Event()  # set once a first list is known

    def members(self) -> tuple[str, ...]:
        with self._lock:
            return self._members

    def subscribe(self, listener: Callable[[tuple[str, ...]], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def _set(self, members: Iterable[str]) -> None:
        new = tuple(sorted(set(members)))
        with self._lock:
            changed = new != self._members
            self._members = new
            listeners = list(self._listeners)
        self.ready.set()
        if changed:
            log.info("cluster members: %s", ", ".join(new) or "(none)", extra={"members": new})
            for listener in listeners:
                listener(new)

    def start(self) -> None:
        """Begin following the source (a thread where it needs one)."""

    def stop(self) -> None:
        """Stop following the source."""


class StaticMembership(Membership):
    """A fixed list of ``host:port`` (config ``cluster.peers`` or ``--peers``)."""

    def __init__(self, peers: Iterable[str]) -> None:
        super().__init__()
        self._set(peers)


def parse_peer(address: str) -> str:
    """``host:port`` checked; ValueError names the bad entry."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"peer {address!r} is not host:port")
    return address
