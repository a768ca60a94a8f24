"""Which sources a volume may name: the administrator's allow-list.

Pod authors write ``volumeAttributes``, so a source is checked before the node
fetches a byte: it must parse as an origin URL (no ``..``, no credentials kept) and
fall under an allowed prefix, at a path boundary (``s3://models/`` allows
``s3://models/llama/`` but never ``s3://models-private/``). A rule may be limited to
namespaces, using the pod information kubelet adds with ``podInfoOnMount``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cachefs.urls import parse_url


@dataclass(frozen=True)
class AllowRule:
    prefix: str  # canonical URL prefix
    namespaces: tuple[str, ...] = ()  # empty: every namespace

    @classmethod
    def parse(cls, prefix: str, namespaces: Iterable[str] = ()) -> AllowRule:
        canonical = parse_url(prefix).canonical
        if prefix.endswith("/") and not canonical.endswith("/"):
            canonical += "/"
        return cls(canonical, tuple(namespaces))

    def allows(self, canonical: str, namespace: str | None) -> bool:
        if self.namespaces and namespace not in self.namespaces:
            return False
        if self.prefix.endswith("/"):
            return canonical.startswith(self.prefix) or canonical + "/" == self.prefix
        return canonical == self.prefix or canonical.startswith(self.prefix + "/")


def check_source(source: str, namespace: str | None, rules: Sequence[AllowRule]) -> str:
    """The canonical URL of ``source`` if a rule allows it; ValueError/PermissionError else."""
    if not source:
        raise ValueError("volumeAttributes.source is missing: name a URL or a prefix ending in /")
    canonical = parse_url(source).canonical  # ValueError for a malformed URL or ".."
    if not rules:
        raise PermissionError(
            "no source is allowed on this node: the administrator must list allowed "
            "prefixes (cachefs csi --allow PREFIX, or csi.allow in the config)"
        )
    if not any(rule.allows(canonical, namespace) for rule in rules):
        where = f" for namespace {namespace}" if namespace else ""
        raise PermissionError(
            f"source {canonical} is not allowed{where}: allowed prefixes are "
            + ", ".join(rule.prefix for rule in rules)
        )
    return canonical
