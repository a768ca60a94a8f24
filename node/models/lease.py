"""Which node writes a model's aggregate status: the holder of one Lease.

The Lease (``coordination.k8s.io/v1``) names its holder and when it last renewed; a
node takes it when it is free or its holder has not renewed for the lease's
duration, and keeps it by renewing. Every write carries the resourceVersion read
before, so of two nodes that try at once one gets 409 Conflict and stays a
follower. A node that stops cleanly gives the lease up (no holder), so another takes
it at its next pass instead of after the duration. Only the aggregate depends on it:
each node reports its own entry anyway.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from cachefs.node.models.api import ModelsApi

log = logging.getLogger("cachefs.models")


class LeaseElection:
    """``is_leader()``: renew or take the lease now, and say whether this node holds it."""

    def __init__(
        self, api: ModelsApi, namespace: str, name: str, identity: str, duration: int = 15
    ) -> None:
        self._api = api
        self._namespace, self._name = namespace, name
        self.identity = identity
        self.duration = duration

    def is_leader(self) -> bool:
        now = _now()
        try:
            lease = self._api.lease(self._namespace, self._name)
            if lease is None:
                self._api.create_lease(self._namespace, self._body(now, transitions=0))
                log.info("model leader: this node (%s) took the new lease", self.identity)
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder and holder != self.identity and not _expired(spec, now):
                return False
            transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.identity)
            body = self._body(now, transitions, lease["metadata"]["resourceVersion"])
            if holder == self.identity:
                body["spec"]["acquireTime"] = spec.get("acquireTime") or body["spec"]["acquireTime"]
            self._api.replace_lease(self._namespace, self._name, body)
            if holder != self.identity:
                log.info(
                    "model leader: this node (%s) took the lease from %s", self.identity, holder
                )
            return True
        except ApiException as exc:
            if exc.status == 409:  # another node wrote it first
                return False
            log.warning("the model lease cannot be read or written: %s", exc.reason)
            return False
        except OSError as exc:
            log.warning("the model lease cannot be read or written: %s", exc)
            return False

    def release(self) -> None:
        """Give the lease up if this node holds it (a clean stop)."""
        try:
            lease = self._api.lease(self._namespace, self._name)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**spec, "holderIdentity": None, "leaseDurationSeconds": 1}
            self._api.replace_lease(self._namespace, self._name, lease)
            log.info("model leader: this node (%s) gave the lease up", self.identity)
        except (ApiException, OSError) as exc:
            log.warning("the model lease cannot be given up: %s", exc)

    def _body(self, now: datetime.datetime, transitions: int, version: str = "") -> dict[str, Any]:
        stamp = now.isoformat(timespec="microseconds").replace("+00:00", "Z")
        metadata: dict[str, Any] = {"name": self._name, "namespace": self._namespace}
        if version:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration,
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": transitions,
            },
        }


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _expired(spec: dict[str, Any], now: datetime.datetime) -> bool:
    renewed = spec.get("renewTime")
    if not renewed:
        return True
    try:
        at = datetime.datetime.fromisoformat(str(renewed).replace("Z", "+00:00"))
    except ValueError:
        return True
    return (now - at).total_seconds() > int(spec.get("leaseDurationSeconds") or 15)
