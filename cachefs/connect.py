"""``connect``: the cache client a caller gets, a node's or one in this process.

This module sits above the node layer: with no endpoint it imports the embedded
engine (``cachefs.node.embedded``), lazily, so that importing the filesystem or the
loaders loads no node module until embedded mode is used.
"""

from __future__ import annotations

import os
from typing import Any

from cachefs.types import CacheClient

ENDPOINT_ENV = "CACHEFS_ENDPOINT"


def connect(
    endpoint: str | None = None,
    cache_dir: str | None = None,
    config: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    timeout: float | None = None,
    token: str | None = None,
) -> CacheClient:
    """A client of the node at ``endpoint`` (else ``CACHEFS_ENDPOINT``), else embedded.

    ``options`` (origin storage options) are used in embedded mode only: a node reads
    origins with its own credentials. ``token``: the cluster token the node asks of
    TCP clients (else ``CACHEFS_TOKEN`` / ``CACHEFS_TOKEN_FILE``).
    """
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
    if token is not None and not endpoint:
        raise ValueError(
            "a token is presented to a node, and no node is named: give endpoint= "
            "(or CACHEFS_ENDPOINT), or drop the token for embedded mode"
        )
    if endpoint:
        if cache_dir or config:
            raise ValueError(
                "cache_dir and config configure an embedded cache; with an endpoint the "
                "node's own configuration applies"
            )
        from cachefs.client import get_client

        return get_client(endpoint, timeout=timeout, token=token)
    from cachefs.node.embedded import EmbeddedClient

    return EmbeddedClient(cache_dir, config, options)
