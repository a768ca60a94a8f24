"""The membership source a node's ``cluster`` configuration names, not started yet."""

from __future__ import annotations

import os
from pathlib import Path

from cachefs.node.cluster.membership import Membership, StaticMembership, parse_peer
from cachefs.node.config import ClusterConfig


def membership_from_config(cluster: ClusterConfig) -> Membership | None:
    """The source ``cluster.membership`` names (None for ``none``), not started yet."""
    if cluster.membership == "static":
        return StaticMembership(parse_peer(p) for p in cluster.peers)
    if cluster.membership == "dns":
        from cachefs.node.cluster.dns import DnsMembership  # dnspython: only when used

        return DnsMembership(
            cluster.dns_name, cluster.dns_port, cluster.dns_resolver, cluster.refresh_interval
        )
    if cluster.membership == "kubernetes":
        from cachefs.node.kube import KubernetesMembership  # the kubernetes client

        return KubernetesMembership(
            service=cluster.kubernetes_service,
            namespace=cluster.kubernetes_namespace or _own_namespace(),
            port_name=cluster.kubernetes_port_name,
            api_url=cluster.kubernetes_api_url,
            kubeconfig=cluster.kubeconfig,
        )
    return None


_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _own_namespace() -> str:
    """The pod's namespace: POD_NAMESPACE, else its service account's, else default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return Path(_SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or "default"
    except OSError:
        return "default"
