"""Which nodes are still there: a Lease per node, renewed as a heartbeat.

A node that crashes, or whose Node is deleted, cannot remove its own entries from
the models' status, so each node renews a Lease of its own (``coordination.k8s.io``,
as kubelets do in ``kube-node-lease``: https://kubernetes.io/docs/concepts/
architecture/leases/#node-heartbeats) and the leader drops the entries of nodes whose
Lease stopped changing. The leader judges by its own clock: a Lease is stale when its
``renewTime`` has not changed for ``leaseDurationSeconds`` since this leader first saw
that value (the node lifecycle controller does the same), so clocks that disagree
between nodes never drop a live node, and a new leader waits a full duration before
it drops anyone. A missing Lease counts as one that stopped changing.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from collections.abc import Iterable

import xxhash
from kubernetes.client.exceptions import ApiException

from cachefs.node.models.api import ModelsApi

log = logging.getLogger("cachefs.models")
_MAX_NAME = 253  # a Lease's name is a DNS subdomain


def heartbeat_seconds(resync: float) -> int:
    """A node's Lease duration: four passes of the model loop, 5 s at least (kubelets
    renew every 10 s a Lease of 40 s)."""
    return max(5, math.ceil(4 * resync))


def node_lease_name(prefix: str, node: str) -> str:
    """The Lease of ``node``: ``<prefix>-node-<node>``, hashed where that is too long."""
    name = f"{prefix}-node-{node}"
    if len(name) <= _MAX_NAME:
        return name
    return f"{name[: _MAX_NAME - 17]}-{xxhash.xxh3_64_hexdigest(node.encode())}"


class Presence:
    """This node's heartbeat (``start``/``stop``) and the leader's view of the others."""

    def __init__(
        self, api: ModelsApi, namespace: str, prefix: str, node: str, duration: int
    ) -> None:
        self._api = api
        self._namespace, self._prefix = namespace, prefix
        self.node = node
        self.duration = duration
        self.beating = threading.Event()  # set once this node's Lease was written
        self._stopped = threading.Event()
        self._seen: dict[str, tuple[str | None, float]] = {}  # node -> (renewTime, since)
        self._checked: tuple[float, frozenset[str], set[str]] = (0.0, frozenset(), set())
        self._thread = threading.Thread(target=self._run, name="cachefs-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        interval = self.duration / 4
        while not self._stopped.is_set():
            try:
                self.beat()
                self.beating.set()
            except (ApiException, OSError) as exc:
                reason = exc.reason if isinstance(exc, ApiException) else exc
                log.warning("this node's heartbeat Lease cannot be renewed: %s", reason)
            self._stopped.wait(interval)

    def beat(self) -> None:
        """Create or renew this node's Lease (409: another write won; next time)."""
        name = node_lease_name(self._prefix, self.node)
        stamp = _stamp()
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": self.duration,
            "renewTime": stamp,
        }
        lease = self._api.lease(self._namespace, name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": self._namespace},
                "spec": {**spec, "acquireTime": stamp},
            }
            self._api.create_lease(self._namespace, body)
            return
        lease["spec"] = {**(lease.get("spec") or {}), **spec}
        try:
            self._api.replace_lease(self._namespace, name, lease)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def gone(self, nodes: Iterable[str]) -> set[str]:
        """Of ``nodes``, those whose Lease has not changed for its duration, as this
        node has watched it (an API error: not gone, we do not know). The Leases are
        read a few times per duration at most, however often a pass runs."""
        now = time.monotonic()
        names = frozenset(nodes)
        at, asked, found = self._checked
        if names == asked and now - at < self.duration / 4:
            return found
        found = set()
        for node in names - {self.node}:
            try:
                lease = self._api.lease(self._namespace, node_lease_name(self._prefix, node))
            except (ApiException, OSError):
                continue
            spec = (lease or {}).get("spec") or {}
            renewed = spec.get("renewTime")
            seen, since = self._seen.get(node, (None, now))
            if node not in self._seen or renewed != seen:
                self._seen[node] = (renewed, now)
                continue
            if now - since > int(spec.get("leaseDurationSeconds") or self.duration):
                found.add(node)
        for node in set(self._seen) - names:
            del self._seen[node]  # no entry left: forget it
        self._checked = (now, names, found)
        return found


def _stamp() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z")
