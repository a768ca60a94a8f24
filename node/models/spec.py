"""A CachedModel as the node reads it: its spec checked, its manifest named.

The API server validates objects against the CRD's schema, but a node does not rely
on it (an older CRD, a schema switched off): every value is checked again here, and
a bad one becomes the object's ``Resolved=False`` condition, not a crash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachefs.node.engine import Manifest
from cachefs.node.origins import ObjectRef
from cachefs.urls import canonical_source, parse_url

GROUP = "cachefs.io"
VERSION = "v1alpha1"
PLURAL = "cachedmodels"
KIND = "CachedModel"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = "cachefs.io/unpin"  # nodes release their pins before the object goes
POLICIES = ("Pinned", "Latest")
_REVISION = re.compile(r"[!-~]{1,256}")  # printable, no whitespace
_TIER = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Kubernetes object names (https://kubernetes.io/docs/concepts/overview/working-with-
# objects/names/): a namespace is a DNS-1123 label, a CachedModel a DNS-1123 subdomain.


@dataclass(frozen=True)
class ModelSpec:
    """One CachedModel: where it lives in the API and what it asks for."""

    namespace: str
    name: str
    generation: int
    source: str  # canonical
    revision: str | None = None
    update_policy: str = "Pinned"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tier: str | None = None
    pin: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def holder(self, version: str) -> str:
        """The pin holder of one version of this model on a node."""
        return f"model:{self.key}@{version}"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with ``labels`` is one of this model's nodes."""
        return all(labels.get(k) == v for k, v in self.node_selector.items())


def parse_model(obj: Mapping[str, Any]) -> ModelSpec:
    """The spec of a CachedModel as the API returned it; ValueError naming the field."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ValueError("spec is missing")
    source = spec.get("source")
    if not isinstance(source, str) or not source:
        raise ValueError("spec.source is required: a URL or a prefix ending in /")
    try:
        canonical = canonical_source(source)
    except ValueError as exc:
        raise ValueError(f"spec.source: {exc}") from None
    revision = spec.get("revision")
    if revision is not None and (
        not isinstance(revision, str) or not _REVISION.fullmatch(revision)
    ):
        raise ValueError("spec.revision must be up to 256 printable characters, no spaces")
    policy = spec.get("updatePolicy", "Pinned")
    if policy not in POLICIES:
        raise ValueError(f"spec.updatePolicy must be one of {', '.join(POLICIES)}, not {policy!r}")
    selector = spec.get("nodeSelector") or {}
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise ValueError("spec.nodeSelector must map label names to values")
    tier = spec.get("tier")
    if tier is not None and (not isinstance(tier, str) or not _TIER.fullmatch(tier)):
        raise ValueError(f"spec.tier {tier!r} is not a tier name")
    pin = spec.get("pin", True)
    if not isinstance(pin, bool):
        raise ValueError("spec.pin must be true or false")
    return ModelSpec(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        generation=int(meta.get("generation") or 0),
        source=canonical,
        revision=revision,
        update_policy=policy,
        node_selector=dict(selector),
        tier=tier,
        pin=pin,
    )


def manifest_version(objects: Sequence[ObjectRef]) -> str:
    """One name for a manifest: a hash of its objects' URLs and versions (a model's
    revision when it has several files; a single object's is its own version)."""
    digest = hashlib.sha256()
    for ref in sorted(objects, key=lambda r: r.canonical):
        digest.update(f"{ref.canonical}\t{ref.version}\n".encode())
    return f"sha256:{digest.hexdigest()[:32]}"


def manifest_record(manifest: Manifest) -> list[dict[str, Any]]:
    """The manifest as ``status.resolved.manifest`` keeps it."""
    return [
        {"url": ref.canonical, "version": ref.version, "size": ref.size, "etag": ref.etag or ""}
        for ref in manifest.objects
    ]


def manifest_from_record(source: str, record: Sequence[Mapping[str, Any]]) -> Manifest:
    """``status.resolved.manifest`` back as a Manifest (the node checks each entry
    against its origin before it fetches: a stated manifest is never trusted)."""
    refs = []
    for entry in record:
        size = entry.get("size")
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"status.resolved.manifest: a bad size for {entry.get('url')!r}")
        refs.append(
            ObjectRef(
                parse_url(str(entry["url"])),
                str(entry["version"]),
                size,
                str(entry.get("etag") or "") or None,
            )
        )
    return Manifest((source,), tuple(refs))
