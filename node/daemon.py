"""``cachefs node``: the engine as a long-lived daemon, serving the gRPC API.

Two listeners serve one service: a unix socket for local clients (its file mode and
group decide who connects; ``local_socket.py`` tells the servicer each connection's
uid and gid) and, when an address is given, TCP for remote clients and peers, which
must present the cluster token or a pod token (and speak TLS when a certificate is
configured). Who may then do what is the policy's business (``policy.py``). The
standard health service answers on both, without a token. SIGTERM
or SIGINT drain: health turns NOT_SERVING, new calls are refused, calls in flight
get ``shutdown_grace`` seconds to finish.
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import ssl
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cachefs.auth import read_token
from cachefs.client import TLS_CA_ENV
from cachefs.node.auth import Authenticator
from cachefs.node.cluster.block_server import BlockServer
from cachefs.node.cluster.from_config import membership_from_config
from cachefs.node.cluster.peers import Peers
from cachefs.node.config import Config
from cachefs.node.engine import Engine
from cachefs.node.labels import SourceLabels
from cachefs.node.local_socket import LocalSocket
from cachefs.node.metrics import CallStats, NodeCollector, serve_metrics
from cachefs.node.pod_tokens import PodTokens
from cachefs.node.scrubber import Scrubber
from cachefs.node.server import MAX_CHUNK, CacheServicer, node_id_default
from cachefs.node.service import CacheService
from cachefs.node.signals import wait_for_termination
from cachefs.node.store.ownership import Owner
from cachefs.proto import cachefs_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from cachefs.node.models.controller import ModelController

log = logging.getLogger("cachefs.node")
SERVICE_NAME = "cachefs.v1.Cache"
_MESSAGE_OVERHEAD = 64 * 1024


@dataclass
class Listeners:
    socket: str | None
    address: str | None
    metrics_address: str | None


def default_socket() -> str:
    if os.geteuid() == 0:
        return "/run/cachefs/cachefs.sock"
    import platformdirs

    return str(Path(platformdirs.user_runtime_dir("cachefs")) / "cachefs.sock")


def server_options(config: Config) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.server.max_request_bytes),
        ("grpc.max_send_message_length", MAX_CHUNK + _MESSAGE_OVERHEAD),
        # Clients ping every 10 s to notice a dead node: allow it, even between calls.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


class Node:
    """One running daemon: engine, servicer, listeners, metrics endpoint."""

    def __init__(self, config: Config, listeners: Listeners) -> None:
        self.config = config
        self.membership = membership_from_config(config.cluster)
        self.peers: Peers | None = None
        if self.membership is not None:
            if not listeners.address:
                raise ValueError(
                    f"cluster.membership {config.cluster.membership} needs a TCP listener for "
                    "the peers: give --address HOST:PORT"
                )
            self.peers = Peers(
                self.membership,
                self_address="",  # known once the TCP listener is bound
                timeout=config.cluster.peer_timeout,
                backoff=config.cluster.backoff,
                token=read_token(),
                tls_ca=os.environ.get(TLS_CA_ENV),
            )
        endpoint = f"unix://{listeners.socket}" if listeners.socket else listeners.address or ""
        self.engine = Engine(config, peers=self.peers, owner=Owner(node=True, endpoint=endpoint))
        self.scrubber = Scrubber(self.engine.store, config.scrub) if config.scrub.rate else None
        self.labels = _source_labels(config, self.engine) if config.cluster.label_node else None
        self.service = CacheService(
            self.engine, config.server.node_id or node_id_default(), self.peers
        )
        self.calls = CallStats()
        self._pod_tokens = PodTokens(config.cluster.kubernetes_api_url, config.cluster.kubeconfig)
        self._local_socket: LocalSocket | None = None
        self._socket_file: tuple[int, int] | None = None  # (device, inode) this node bound
        self._relay_dir: Path | None = None
        self.health = health.HealthServicer()
        self.servers: list[grpc.Server] = []
        self.bound: dict[str, str] = {}
        self._metrics_server: Any = None
        self._block_server: BlockServer | None = None
        self._models: ModelController | None = None
        self._stopped = threading.Event()
        self._serving = False  # set once every listener is up: only then is a stop logged
        try:
            self._listen(listeners)
        except BaseException:
            self.stop(0)
            raise
        self._serving = True
        if self.scrubber is not None:  # once the listeners are up
            self.scrubber.start()

    def _server(self, authenticator: Authenticator) -> grpc.Server:
        server = grpc.server(
            ThreadPoolExecutor(self.config.server.workers, thread_name_prefix="cachefs-rpc"),
            options=server_options(self.config),
            maximum_concurrent_rpcs=self.config.server.workers * 4,
        )
        servicer = CacheServicer(self.service, authenticator, self.calls)
        pb_grpc.add_CacheServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.servers.append(server)
        return server

    def _listen(self, listeners: Listeners) -> None:
        server_config = self.config.server
        token = read_token()
        if listeners.socket:
            # The socket is ours (it knows each peer's uid); gRPC listens behind it on
            # a socket in a directory only this process may enter, and answers only
            # connections the socket relays.
            path = Path(listeners.socket)
            _prepare_socket_path(path)
            authenticator = Authenticator(token, self._pod_tokens)
            server = self._server(authenticator)
            self._relay_dir = Path(tempfile.mkdtemp(prefix="cachefs-relay-"))  # 0700
            inner = self._relay_dir / "grpc.sock"
            if server.add_insecure_port(f"unix:{inner}") == 0:
                raise OSError(f"cannot listen on {inner} behind the unix socket")
            authenticator.local_socket = LocalSocket(path, inner)
            self._local_socket = authenticator.local_socket
            self._socket_file = _file_identity(path)
            server.start()
            self._local_socket.start()
            _secure_socket(path, server_config.socket_mode, server_config.socket_group)
            self.bound["socket"] = f"unix://{path}"
            self.bound["socket_relay"] = f"unix://{inner}"  # answers the socket's relay only
        if listeners.address:
            if token is None:
                raise PermissionError(
                    f"TCP clients ({listeners.address}) must present a shared token: set "
                    "CACHEFS_TOKEN or CACHEFS_TOKEN_FILE for the node and its clients"
                )
            server = self._server(Authenticator(token, self._pod_tokens))
            if server_config.tls_cert and server_config.tls_key:
                credentials = grpc.ssl_server_credentials(
                    [(_read_pem(server_config.tls_key), _read_pem(server_config.tls_cert))]
                )
                port = server.add_secure_port(listeners.address, credentials)
            else:
                port = server.add_insecure_port(listeners.address)
            if port == 0:
                raise OSError(f"cannot listen on {listeners.address}: in use or not an address")
            server.start()
            host = listeners.address.rpartition(":")[0]
            self.bound["address"] = f"{host}:{port}"
        if listeners.metrics_address:
            collector = NodeCollector(
                self.engine, self.service.jobs, self.calls, self.peers, self.scrubber
            )
            self._metrics_server, port = serve_metrics(listeners.metrics_address, collector)
            host = listeners.metrics_address.rpartition(":")[0]
            self.bound["metrics_address"] = f"{host}:{port}"
        if not self.servers:
            raise ValueError("the node listens nowhere: give a socket path or an address")
        if self.peers is not None and self.membership is not None:
            self.peers.self_address = self.config.cluster.self_address or _advertised(
                self.bound["address"]
            )
            self.bound["self_address"] = self.peers.self_address
            self._serve_blocks(listeners.address, token)
            self.membership.start()
        if self.labels is not None:
            self.labels.start()
        if self.config.models.enabled:
            self._models = _model_controller(self.config, self.service)
            self.service.models = self._models  # what volumes that name a model get
            self._models.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def _serve_blocks(self, address: str | None, token: str | None) -> None:
        """The peer block endpoint, on the TCP listener's host (see block_server)."""
        assert address and token  # a cluster needs the TCP listener, which needs a token
        host = address.rpartition(":")[0]
        server_config = self.config.server
        tls = None
        if server_config.tls_cert and server_config.tls_key:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(server_config.tls_cert, server_config.tls_key)
        self._block_server = BlockServer(
            f"{host}:{self.config.cluster.block_port}", self.service, token, self.calls, tls
        )
        self._block_server.start()
        self.service.block_port = self._block_server.port
        self.bound["block_address"] = f"{host}:{self._block_server.port}"

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let calls in flight finish within ``grace`` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.server.shutdown_grace if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self._models is not None:  # first: its fills end as cancelled, not failed
            self._models.stop()
        self.service.jobs.shutdown()
        # The node that replaces this one may take the directories now; this one only
        # finishes the calls in flight.
        self.engine.store.release_directories()
        if self.scrubber is not None:
            self.scrubber.stop()
        if self.membership is not None:
            self.membership.stop()
        if self.labels is not None:
            self.labels.stop()
        if self._serving:  # a node that never started has nothing to drain: its error says
            log.info("draining: new calls are refused, %d s for calls in flight", grace)
        if self._local_socket is not None:
            self._local_socket.close()  # no new connections; relays in flight go on
        events = [server.stop(grace) for server in self.servers]
        for event in events:
            event.wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._block_server is not None:
            self._block_server.stop()
        # A new node may already listen on this path (an upgrade that started it while
        # this one drained): only the file this node bound is removed.
        socket_path = self._local_socket.path if self._local_socket is not None else None
        if socket_path is not None and _file_identity(socket_path) == self._socket_file:
            socket_path.unlink(missing_ok=True)
        if self._relay_dir is not None:
            shutil.rmtree(self._relay_dir, ignore_errors=True)
        self.engine.close()
        if self.peers is not None:
            self.peers.close()
        if self._serving:
            log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()


def run(config: Config, listeners: Listeners) -> int:
    """Serve until SIGTERM/SIGINT, then drain; the exit status."""
    node = Node(config, listeners)
    log.info("serving", extra={"node_id": node.service.node_id, **node.bound})
    wait_for_termination()
    node.stop()
    return 0


def _prepare_socket_path(path: Path) -> None:
    """Make the socket's directory, and clear a stale socket a dead node left."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o755)
    if path.exists() or path.is_symlink():
        import socket

        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a dead node's socket
        else:
            raise OSError(f"another node already listens on {path}; stop it or pick --socket")
        finally:
            probe.close()


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, None if there is none."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _secure_socket(path: Path, mode: int, group: str | None) -> None:
    if group is not None:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def _model_controller(config: Config, service: CacheService) -> ModelController:
    """The CachedModel loop of this node (node/models), on the cluster's API."""
    from cachefs.node.kube import NodeLabels, api_client
    from cachefs.node.models.api import ModelsApi
    from cachefs.node.models.controller import ModelController
    from cachefs.node.models.lease import LeaseElection
    from cachefs.node.models.presence import Presence, heartbeat_seconds

    node_name = os.environ.get("NODE_NAME") or service.node_id
    cluster, models = config.cluster, config.models
    api = ModelsApi(api_client(cluster.kubernetes_api_url, cluster.kubeconfig))
    namespace = models.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
    election = LeaseElection(api, namespace, models.lease_name, node_name)
    presence = Presence(
        api, namespace, models.lease_name, node_name, heartbeat_seconds(models.resync)
    )
    labels = NodeLabels(node_name, cluster.kubernetes_api_url, cluster.kubeconfig)
    return ModelController(
        service, api, node_name, labels.get, election, presence, resync=models.resync
    )


def _source_labels(config: Config, engine: Engine) -> SourceLabels:
    """Node labels for the sources complete here, kept in step with the engine."""
    from cachefs.node.kube import NodeLabels

    cluster = config.cluster
    api = NodeLabels(
        os.environ.get("NODE_NAME", ""), cluster.kubernetes_api_url, cluster.kubeconfig
    )
    store = engine.store

    def is_complete(object_id: str) -> bool:
        obj = store.get(object_id)
        return obj is not None and obj.complete

    labels = SourceLabels(api, store.tiers[-1].root / "v1" / "labels.json", is_complete)
    engine.complete_listeners.append(
        lambda manifest: labels.complete(manifest.sources, (r.id for r in manifest.objects))
    )
    store.removed_listeners.append(labels.removed)
    return labels


def _advertised(bound: str) -> str:
    """How peers reach this node: the TCP address, with a wildcard host replaced by
    the pod's IP (POD_IP, from the downward API)."""
    host, _, port = bound.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        pod_ip = os.environ.get("POD_IP")
        if not pod_ip:
            raise ValueError(
                f"the node listens on {bound}, which peers cannot dial: set "
                "cluster.self_address (or POD_IP) to this node's reachable address"
            )
        host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"{host}:{port}"


def _read_pem(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS file {path}: {exc.strerror}") from None
