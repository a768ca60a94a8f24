"""The Kubernetes API calls the model controller makes, as plain JSON.

CachedModels are listed and watched across namespaces (a watch resumes from the last
resourceVersion; 410 Gone means list again); each node writes its own entry of
``status.nodes`` by server-side apply with a field manager of its own, so nodes never
overwrite each other; the leader's aggregate goes the same way under its manager;
finalizers are changed with the object's resourceVersion as a precondition (409 on a
stale one). Leases are read, created and replaced for the leader election.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from cachefs.node.models.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
_TIMEOUT = (10.0, 30.0)  # connect, read


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class ModelsApi:
    """CachedModels and Leases through one API client."""

    def __init__(self, api: client.ApiClient) -> None:
        self._objects = client.CustomObjectsApi(api)
        self._leases = client.CoordinationV1Api(api)

    def list(self) -> tuple[list[dict[str, Any]], str]:
        """Every CachedModel, and the list's resourceVersion."""
        body = _json(
            self._objects.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _preload_content=False, _request_timeout=_TIMEOUT
            )
        )
        return list(body.get("items") or ()), str(body["metadata"]["resourceVersion"])

    def watch(self, resource_version: str, seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) of each change after ``resource_version``; BOOKMARKs too."""
        stream = watch.Watch().stream(
            self._objects.list_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds,
            _request_timeout=(_TIMEOUT[0], seconds + 10),
        )
        for event in stream:
            kind, obj = str(event.get("type")), event.get("raw_object") or event.get("object")
            if kind == "ERROR":
                if isinstance(obj, dict) and obj.get("code") == 410:
                    raise Expired(str(obj.get("message") or "410 Gone"))
                raise OSError(f"the watch of cachedmodels failed: {obj}")
            if isinstance(obj, dict):
                yield kind, obj

    def apply_status(
        self,
        namespace: str,
        name: str,
        manager: str,
        status: dict[str, Any],
        timeout: tuple[float, float] = _TIMEOUT,
    ) -> dict[str, Any]:
        """Server-side apply of ``status`` (the fields ``manager`` owns, all of them:
        what it applied before and leaves out now is removed)."""
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": status,
        }
        return _json(
            self._objects.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body,
                field_manager=manager,
                force=True,
                _content_type=APPLY,
                _preload_content=False,
                _request_timeout=timeout,
            )
        )

    def set_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> dict[str, Any]:
        """Replace the object's finalizers, if it is still at ``resource_version``."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        return _json(
            self._objects.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body,
                _content_type=MERGE,
                _preload_content=False,
                _request_timeout=_TIMEOUT,
            )
        )

    def lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(
                self._leases.read_namespaced_lease(
                    name, namespace, _preload_content=False, _request_timeout=_TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return _json(
            self._leases.create_namespaced_lease(
                namespace, body, _preload_content=False, _request_timeout=_TIMEOUT
            )
        )

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Replace the lease; 409 when its resourceVersion is stale (another won)."""
        return _json(
            self._leases.replace_namespaced_lease(
                name, namespace, body, _preload_content=False, _request_timeout=_TIMEOUT
            )
        )


def _json(response: Any) -> dict[str, Any]:
    data = response.data if hasattr(response, "data") else response
    return json.loads(data) if isinstance(data, bytes | str) else dict(data)
