"""Membership from Kubernetes: the EndpointSlices of the cachefs Service, watched.

The Service's EndpointSlices (label ``kubernetes.io/service-name=<service>``) list
every pod behind it with a ``ready`` condition. We list them once, then watch from
the list's resourceVersion and apply each ADDED / MODIFIED / DELETED event, so a
node that starts or stops changes the members within a second, without a restart.
A watch that ends is resumed from the last resourceVersion seen; one that expired
(410 Gone) or failed is replaced by a fresh list, after a short backoff on errors.

The API is reached with the official client: the pod's service account by default
(in-cluster config), a kubeconfig file, or a plain URL (``kubectl proxy``, tests).
Slices are read as the API's JSON, not as the client's generated models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from typing import Any

from kubernetes import client, config, watch

from cachefs.node.cluster.membership import Membership

log = logging.getLogger("cachefs.cluster.kubernetes")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_CONNECT_TIMEOUT = 10.0
_LIST_READ_TIMEOUT = 30.0
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0
_SHORT_WATCH = 1.0  # a watch that ends sooner, with no event, waits before the next


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def endpoint_members(slice_: dict[str, Any], port_name: str) -> tuple[str, ...]:
    """``host:port`` of the slice's endpoints that are not marked not-ready."""
    port = None
    for entry in slice_.get("ports") or ():
        if (entry.get("name") or "") == port_name and entry.get("port"):
            port = int(entry["port"])
            break
    if port is None:
        return ()
    members = []
    for endpoint in slice_.get("endpoints") or ():
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses") or ():
            members.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    return tuple(members)


def _describe(error: BaseException) -> str:
    """An error for the log: status and reason of an API error, never headers or body."""
    if isinstance(error, client.ApiException):
        return f"HTTP {error.status} {error.reason or ''}".strip()
    return f"{type(error).__name__}: {error}"


def api_client(api_url: str | None = None, kubeconfig: str | None = None) -> client.ApiClient:
    """An API client: ``kubeconfig`` if given, else in-cluster config; ``api_url``
    overrides the server's address (alone: a plain URL without credentials)."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
    elif not api_url:
        config.load_incluster_config(client_configuration=configuration)
    if api_url:
        configuration.host = api_url.rstrip("/")
    return client.ApiClient(configuration)


class NodeLabels:
    """Labels of one Node object, read and patched through the API (get, patch)."""

    def __init__(
        self, node_name: str, api_url: str | None = None, kubeconfig: str | None = None
    ) -> None:
        if not node_name:
            raise ValueError("labelling the node needs its name: set NODE_NAME")
        self.node_name = node_name
        self._api = client.CoreV1Api(api_client(api_url, kubeconfig))

    def get(self) -> dict[str, str]:
        response = self._api.read_node(self.node_name, _preload_content=False)
        return dict((json.loads(response.data).get("metadata") or {}).get("labels") or {})

    def patch(self, labels: dict[str, str | None]) -> None:
        """Set labels; a None value removes the label."""
        self._api.patch_node(self.node_name, {"metadata": {"labels": labels}})


class KubernetesMembership(Membership):
    """The ready endpoints of ``service`` in ``namespace``, on its port ``port_name``.

    Credentials: ``kubeconfig`` (a file) if given, else in-cluster config (the pod's
    service account token and CA, refreshed by the client); ``api_url`` sets the API
    server's address (alone: a plain URL without credentials, e.g. ``kubectl proxy``).
    ``watch_timeout`` is how long the API server keeps one watch open (seconds).
    """

    def __init__(
        self,
        service: str,
        namespace: str,
        port_name: str = "grpc",
        api_url: str | None = None,
        kubeconfig: str | None = None,
        watch_timeout: int = 300,
    ) -> None:
        super().__init__()
        if not service or not namespace:
            raise ValueError("kubernetes membership needs a service and a namespace")
        self.service = service
        self.namespace = namespace
        self.port_name = port_name or ""
        self.selector = f"{SERVICE_NAME_LABEL}={service}"
        self.watch_timeout = int(watch_timeout)
        self._api = client.DiscoveryV1Api(api_client(api_url, kubeconfig))
        self._slices: dict[str, tuple[str, ...]] = {}
        self._version: str | None = None  # resourceVersion to watch from
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: watch.Watch | None = None
        self._response: Any = None  # the open watch response, to cut it on stop
        self._response_lock = threading.Lock()
        self.lists = 0  # completed lists (the first, and each after an expiry or error)

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        try:
            self._list()
            listed = True
        except Exception as e:
            log.warning("kubernetes membership: listing %s failed: %s", self.selector, _describe(e))
            listed = False
        self._thread = threading.Thread(
            target=self._run, args=(listed,), name="cachefs-kube-membership", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        stream = self._watch
        if stream is not None:
            stream.stop()
        self._cut_response()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_CONNECT_TIMEOUT)

    def _cut_response(self) -> None:
        """Shut the open watch's socket down, so a read blocked on it returns now."""
        with self._response_lock:
            response = self._response
        connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # already shut or closed
                sock.shutdown(socket.SHUT_RDWR)

    # -- list and watch ----------------------------------------------------------

    def _run(self, listed: bool) -> None:
        backoff = _BACKOFF_MIN
        while not self._stop.is_set():
            try:
                if not listed:
                    self._list()
                    listed = True
                began = time.monotonic()
                events = self._watch_once()
                if events or time.monotonic() - began >= _SHORT_WATCH:
                    backoff = _BACKOFF_MIN
                    continue
                # Ended at once without news: do not hammer the API server.
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except _Expired:
                log.info("kubernetes membership: watch expired (410 Gone); listing again")
                listed = False
            except Exception as e:
                if self._stop.is_set():
                    break
                log.warning(
                    "kubernetes membership: watching %s failed: %s; listing again in %.1fs",
                    self.selector,
                    _describe(e),
                    backoff,
                )
                listed = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _list(self) -> None:
        response = self._api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=(_CONNECT_TIMEOUT, _LIST_READ_TIMEOUT),
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        slices = {}
        for item in body.get("items") or ():
            slices[item["metadata"]["name"]] = endpoint_members(item, self.port_name)
        version = (body.get("metadata") or {}).get("resourceVersion")
        if self._stop.is_set():
            return
        self._slices = slices
        self._version = str(version) if version else None
        self.lists += 1
        self._publish()

    def _watch_request(self, **kwargs: Any):  # no return annotation: Watch reads it
        """The watch call; keeps its response so that ``stop`` can cut it."""
        response = self._api.list_namespaced_endpoint_slice(self.namespace, **kwargs)
        with self._response_lock:
            self._response = response
        if self._stop.is_set():
            self._cut_response()
        return response

    def _watch_once(self) -> int:
        """One watch from the last resourceVersion, until it ends; the events applied."""
        stream = watch.Watch()
        self._watch = stream
        kwargs: dict[str, Any] = {
            "label_selector": self.selector,
            "allow_watch_bookmarks": True,
            "timeout_seconds": self.watch_timeout,
            "_request_timeout": (_CONNECT_TIMEOUT, self.watch_timeout + _LIST_READ_TIMEOUT),
        }
        if self._version:
            kwargs["resource_version"] = self._version
        applied = 0
        try:
            for event in stream.stream(self._watch_request, **kwargs):
                if self._stop.is_set():
                    break
                self._apply(event.get("type"), event.get("raw_object") or event.get("object"))
                applied += 1
        except client.ApiException as e:
            if e.status == 410:
                raise _Expired from e
            raise
        finally:
            with self._response_lock:
                self._response = None
            self._watch = None
        return applied

    def _apply(self, kind: str | None, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        metadata = obj.get("metadata") or {}
        version = metadata.get("resourceVersion")
        if version:
            self._version = str(version)
        name = metadata.get("name")
        if kind == "BOOKMARK" or not name:
            return
        if kind in ("ADDED", "MODIFIED"):
            self._slices[name] = endpoint_members(obj, self.port_name)
        elif kind == "DELETED":
            self._slices.pop(name, None)
        else:
            return
        self._publish()

    def _publish(self) -> None:
        if not self._stop.is_set():
            self._set(member for members in self._slices.values() for member in members)
