"""The token check on the node's TCP listener: a gRPC server interceptor.

Calls without the shared token, or with another one, end with UNAUTHENTICATED
before any handler runs. The health service is exempt so that kubelet's gRPC probe
works. The unix socket has no interceptor: its file mode and group decide who
connects.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

from cachefs.auth import METADATA_KEY, SCHEME

EXEMPT_PREFIX = "/grpc.health.v1.Health/"


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIX):
            return handler
        presented = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        if isinstance(presented, str) and presented.startswith(SCHEME):
            if hmac.compare_digest(presented[len(SCHEME) :].encode(), self._expected):
                return handler
            reason = "the token is wrong"
        else:
            reason = "no token was presented"
        return _refusal(handler, f"{reason}: TCP clients must present the node's token")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only refuses the call."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    shape = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[shape]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
