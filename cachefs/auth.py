"""The shared token TCP clients and peers present to a node.

It comes from ``CACHEFS_TOKEN`` or from the file ``CACHEFS_TOKEN_FILE`` names (a
mounted Kubernetes Secret), travels as ``authorization: Bearer <token>`` metadata,
and is never logged, put in a metric or quoted in an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "CACHEFS_TOKEN"
TOKEN_FILE_ENV = "CACHEFS_TOKEN_FILE"
METADATA_KEY = "authorization"
SCHEME = "Bearer "


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
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"the token from {source} holds whitespace or control characters")
    return token


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, SCHEME + token),)
