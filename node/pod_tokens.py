"""Pods prove who they are with a projected ServiceAccount token, checked by the API.

A pod that mounts the node's socket (or calls its TCP port) presents a token that
kubelet projected for the audience ``cachefs`` (``CACHEFS_POD_TOKEN_FILE`` on the
client). The node asks the Kubernetes TokenReview API whether the token is valid for
that audience and whose it is (``system:serviceaccount:<namespace>:<name>``); the
answer is kept for a short while, keyed by a hash of the token, so a busy client
costs one review per minute. The token is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

from cachefs.node.callers import Caller

log = logging.getLogger("cachefs.node")

AUDIENCE = "cachefs"
CACHE_SECONDS = 60.0
_CACHED_MAX = 4096
_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class PodTokens:
    """TokenReview through the Kubernetes API, with a short cache."""

    def __init__(self, api_url: str | None = None, kubeconfig: str | None = None) -> None:
        self._api_url, self._kubeconfig = api_url, kubeconfig
        self._api: Any = None
        self._cache: dict[str, tuple[float, Caller | None]] = {}
        self._lock = threading.Lock()

    def caller(self, token: str) -> Caller:
        """The pod the token belongs to; PermissionError when the API does not say so."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is None or now - cached[0] > CACHE_SECONDS:
            cached = (now, self._review(token))
            with self._lock:
                if len(self._cache) >= _CACHED_MAX:
                    self._cache.clear()
                self._cache[key] = cached
        if cached[1] is None:
            raise PermissionError(
                "the pod token was not accepted by the Kubernetes API for the audience "
                f"{AUDIENCE!r}: project a ServiceAccount token with audience {AUDIENCE} "
                "and point CACHEFS_POD_TOKEN_FILE at it"
            )
        return cached[1]

    def _review(self, token: str) -> Caller | None:
        from kubernetes import client  # the daemon's packages, loaded when a pod calls

        if self._api is None:
            from cachefs.node.kube import api_client

            self._api = client.AuthenticationV1Api(api_client(self._api_url, self._kubeconfig))
        review = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[AUDIENCE])
        )
        try:
            status = self._api.create_token_review(review, _request_timeout=10).status
        except Exception as exc:  # the API is down: refuse, and say so in the log
            log.warning("TokenReview failed: %s", type(exc).__name__)
            raise PermissionError(
                "the node could not check the pod token with the Kubernetes API; try again"
            ) from None
        user = status.user if status and status.authenticated else None
        username = (user.username or "") if user else ""
        if not username.startswith(_SERVICE_ACCOUNT_PREFIX):
            return None
        if AUDIENCE not in (status.audiences or ()):
            return None
        namespace, _, name = username[len(_SERVICE_ACCOUNT_PREFIX) :].partition(":")
        if not namespace or not name:
            return None
        return Caller("pod", namespace=namespace, service_account=name)
