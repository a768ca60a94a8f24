"""``cachefs csi``: the CSI node plugin on the socket kubelet's registrar names.

It serves Identity and Node on ``CSI_ENDPOINT`` (``unix:///csi/csi.sock``) and asks
the local cachefs node (``CACHEFS_ENDPOINT``) for prefetches, pins and views. On
start it re-checks what an earlier run published. SIGTERM stops it; published
volumes stay mounted (the mounts belong to the pods, not to the plugin).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from cachefs.client import NodeClient
from cachefs.csi.identity import IdentityService
from cachefs.csi.node import NodeService
from cachefs.csi.proto import csi_pb2_grpc as csi_grpc
from cachefs.csi.volumes import VolumeRecords
from cachefs.errors import NodeUnavailableError
from cachefs.node.policy import Policy
from cachefs.node.signals import wait_for_termination

log = logging.getLogger("cachefs.csi")
DEFAULT_CSI_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_NODE_ENDPOINT = "unix:///run/cachefs/cachefs.sock"
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class PluginSettings:
    csi_endpoint: str
    node_endpoint: str
    node_id: str
    policy: Policy  # the node's, with --allow rules added
    state_dir: Path
    publish_timeout: float


def socket_path(endpoint: str) -> Path:
    if not endpoint.startswith("unix://") or not endpoint[len("unix://") :].startswith("/"):
        raise ValueError(f"CSI_ENDPOINT {endpoint!r} must be unix:///absolute/path.sock")
    return Path(endpoint[len("unix://") :])


class Plugin:
    def __init__(self, settings: PluginSettings) -> None:
        self.settings = settings
        self._client = NodeClient(settings.node_endpoint, timeout=settings.publish_timeout + 30)
        self.node = NodeService(
            settings.node_id,
            lambda: self._client,
            settings.policy,
            VolumeRecords(settings.state_dir),
            settings.publish_timeout,
        )
        self.identity = IdentityService(self.node_ready)
        self.server: grpc.Server | None = None

    def node_ready(self) -> bool:
        try:
            NodeClient(self.settings.node_endpoint, timeout=PROBE_TIMEOUT).status()
        except (NodeUnavailableError, TimeoutError, OSError):
            return False
        return True

    def start(self) -> None:
        try:
            self.node.reconcile()
        except NodeUnavailableError as exc:
            log.warning("could not check earlier volumes: %s", exc)
        path = socket_path(self.settings.csi_endpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server = grpc.server(ThreadPoolExecutor(16, thread_name_prefix="cachefs-csi"))
        csi_grpc.add_IdentityServicer_to_server(self.identity, server)
        csi_grpc.add_NodeServicer_to_server(self.node, server)
        previous = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix://{path}")
            server.start()
        finally:
            os.umask(previous)
        self.server = server
        log.info("serving", extra={"csi_endpoint": self.settings.csi_endpoint})

    def stop(self, grace: float = 10.0) -> None:
        if self.server is not None:
            self.server.stop(grace).wait()


def run(settings: PluginSettings) -> int:
    plugin = Plugin(settings)
    plugin.start()
    wait_for_termination()
    plugin.stop()
    return 0
