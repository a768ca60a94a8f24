"""Who made a call: the cluster token, a pod token, or the unix socket's peer.

On either listener a call that presents the cluster token (``authorization: Bearer``)
is the ``cluster`` caller, and one that presents a pod token (``cachefs-pod-token``)
is the pod the Kubernetes API says it belongs to. Otherwise a call through the unix
socket is the local process the kernel named when it connected, and a TCP call is
refused (UNAUTHENTICATED). The health service is not ours and asks nothing.
"""

from __future__ import annotations

import hmac

import grpc

from cachefs.auth import METADATA_KEY, POD_TOKEN_KEY, SCHEME
from cachefs.node.callers import Caller
from cachefs.node.local_socket import LocalSocket
from cachefs.node.pod_tokens import PodTokens


class Unauthenticated(Exception):
    """The call says nothing the node can check about who makes it."""


class Authenticator:
    """Establishes the caller of each call on one listener."""

    def __init__(self, cluster_token: str | None, pod_tokens: PodTokens | None) -> None:
        self._cluster_token = cluster_token.encode() if cluster_token else None
        self._pod_tokens = pod_tokens
        # The unix socket whose relay is this listener's only client (its peers are
        # looked up by the address gRPC reports); None for the TCP listener.
        self.local_socket: LocalSocket | None = None

    def caller(self, context: grpc.ServicerContext) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        local = None
        if self.local_socket is not None:
            local = self.local_socket.caller_at(context.peer())
            if local is None:  # only the socket's own relay may reach this listener
                raise Unauthenticated("connect through the node's unix socket")
        presented = metadata.get(METADATA_KEY)
        if isinstance(presented, str) and presented.startswith(SCHEME):
            token = presented[len(SCHEME) :].encode()
            if self._cluster_token is None or not hmac.compare_digest(token, self._cluster_token):
                raise Unauthenticated(
                    "the token is wrong: set CACHEFS_TOKEN or CACHEFS_TOKEN_FILE to the "
                    "node's token"
                )
            return Caller("cluster")
        pod_token = metadata.get(POD_TOKEN_KEY)
        if isinstance(pod_token, str) and pod_token:
            if self._pod_tokens is None:
                raise Unauthenticated("this node checks no pod tokens (it has no Kubernetes API)")
            try:
                return self._pod_tokens.caller(pod_token)
            except PermissionError as exc:
                raise Unauthenticated(str(exc)) from None
        if local is not None:
            return Caller("local", uid=local.uid, gid=local.gid, pid=local.pid)
        raise Unauthenticated(
            "no token was presented: TCP clients must present the node's token "
            "(CACHEFS_TOKEN) or a pod token (CACHEFS_POD_TOKEN_FILE)"
        )
