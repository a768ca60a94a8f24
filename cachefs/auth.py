"""The tokens a client presents to a node: the cluster token and a pod token.

The cluster token comes from ``CACHEFS_TOKEN`` or from the file
``CACHEFS_TOKEN_FILE`` names (a mounted Kubernetes Secret) and travels as
``authorization: Bearer <token>`` metadata: nodes and the operator's own components
hold it. A pod token is a projected ServiceAccount token (audience ``cachefs``) in
the file ``CACHEFS_POD_TOKEN_FILE`` names; kubelet rotates it, so it is read again
for every channel. Neither is ever logged, put in a metric or quoted in an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "CACHEFS_TOKEN"
TOKEN_FILE_ENV = "CACHEFS_TOKEN_FILE"
POD_TOKEN_FILE_ENV = "CACHEFS_POD_TOKEN_FILE"
METADATA_KEY = "authorization"
SCHEME = "Bearer "
POD_TOKEN_KEY = "cachefs-pod-token"


def read_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The token from the environment, or None when neither variable is set."""
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV)
    source = TOKEN_ENV
    if not token and environ.get(TOKEN_FILE_ENV):
        path = environ[TOKEN_FILE_ENV]
        source = f"{TOKEN_FILE_ENV} ({path})"
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise PermissionError(
                f"cannot read the token file that {TOKEN_FILE_ENV} names ({path}): {exc.strerror}"
            ) from None
    if token is None or token == "":
        if TOKEN_ENV in environ or TOKEN_FILE_ENV in environ:
            raise ValueError(f"the token from {source} is empty: set a non-empty token")
        return None
    return check_token(token, f"the token from {source}")


def check_token(token: str, source: str) -> str:
    """``token`` if it can travel as metadata; ValueError naming ``source`` (never the
    token) otherwise."""
    if not isinstance(token, str) or not token:
        raise ValueError(f"{source} is empty or not text: give a non-empty token")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"{source} holds whitespace or control characters")
    return token


def read_pod_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The pod token in the file ``CACHEFS_POD_TOKEN_FILE`` names, or None if unset."""
    environ = os.environ if environ is None else environ
    path = environ.get(POD_TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise PermissionError(
            f"cannot read the pod token that {POD_TOKEN_FILE_ENV} names ({path}): "
            f"{exc.strerror}; project a ServiceAccount token with audience cachefs there"
        ) from None
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"the pod token in {path} ({POD_TOKEN_FILE_ENV}) is empty or malformed")
    return token


def metadata(token: str | None, pod_token: str | None = None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries the tokens a client has."""
    sent = []
    if token:
        sent.append((METADATA_KEY, SCHEME + token))
    if pod_token:
        sent.append((POD_TOKEN_KEY, pod_token))
    return tuple(sent)
