"""The names of CachedModels: checked where a volume or a client names one.

Apart from the rest of ``models`` so that the CSI plugin can check a name without
importing the engine.
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_name(namespace: str, name: str) -> tuple[str, str]:
    """``namespace`` and ``name`` of a CachedModel, if both are Kubernetes names; else a
    ValueError that says which is not and what a name may hold."""
    if not isinstance(namespace, str) or not (len(namespace) <= 63 and _LABEL.fullmatch(namespace)):
        raise ValueError(
            f"namespace {namespace!r} is not a Kubernetes namespace name: up to 63 lower "
            "case letters, digits and '-', starting and ending with a letter or digit"
        )
    if not isinstance(name, str) or not (len(name) <= 253 and _SUBDOMAIN.fullmatch(name)):
        raise ValueError(
            f"cachedModel {name!r} is not a CachedModel name: up to 253 lower case "
            "letters, digits, '-' and '.', starting and ending with a letter or digit"
        )
    return namespace, name
