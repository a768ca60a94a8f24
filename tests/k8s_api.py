"""A tiny Kubernetes API server: EndpointSlices of one namespace, listed and watched.

It speaks the subset the kubernetes membership source uses, as the real API server
does: ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`` with a label
selector returns an EndpointSliceList with ``metadata.resourceVersion``; the same
path with ``watch=true`` streams newline-delimited JSON watch events (chunked HTTP/1.1)
of every change after ``resourceVersion``. A test changes the slices (each change is
an event, delivered to open and later watches), ends open watches, or expires
history (watches from before it get a 410 Gone ERROR event, as after compaction).

It also answers ``POST /apis/authentication.k8s.io/v1/tokenreviews`` as the
TokenReview API does (authentication.k8s.io/v1): the request's ``spec.token`` and
``spec.audiences``; the answer's ``status.authenticated``, ``status.user.username``
(``system:serviceaccount:<namespace>:<name>`` for a ServiceAccount token) and
``status.audiences``: those of the request the token is valid for, and none (not
authenticated, with ``status.error``) when it is valid for none of them. A test
issues tokens with ``issue_token``.
"""

from __future__ import annotations

import copy
import http.server
import json
import threading
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_PATH = "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices"


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[tuple[str, bool | None]],
    port: int = 7070,
    port_name: str = "grpc",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice object: ``endpoints`` are (address, ready); ready None is unset."""
    items = []
    for address, ready in endpoints:
        conditions = {} if ready is None else {"ready": ready, "serving": ready}
        items.append({"addresses": [address], "conditions": conditions})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": address_type,
        "endpoints": items,
        "ports": [
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
            {"name": port_name, "port": port, "protocol": "TCP"},
        ],
    }


class KubeApiServer:
    """``with KubeApiServer("ns") as api``: ``api.url`` is the API server's address."""

    def __init__(self, namespace: str, token: str | None = None) -> None:
        self.namespace = namespace
        self.token = token
        self.requests: list[dict[str, Any]] = []  # each: path, query, watch, authorized
        self._slices: dict[str, dict[str, Any]] = {}
        self._version = 100
        self._events: list[tuple[int, str, dict[str, Any]]] = []
        self._compacted = 0  # watches from a version <= this are too old (410)
        self._ends = 0  # bumped to end open watches
        self._expiries = 0  # bumped to send open watches 410
        self._closing = False
        self._cond = threading.Condition()
        self.open_watches = 0
        self.nodes: dict[str, dict[str, str]] = {}  # Node name -> its labels
        self.patches: list[tuple[str, str, dict[str, Any]]] = []  # name, content type, body
        self.refuse_patches = 0  # answer the next N node patches with 503
        # Issued ServiceAccount tokens: token -> (namespace, name, audiences)
        self.tokens: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        self.reviews = 0  # TokenReviews answered
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-kube-api",
            daemon=True,
        )

    def __enter__(self) -> KubeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # -- what a test does ----------------------------------------------------------

    def put(self, obj: dict[str, Any], quiet: bool = False) -> None:
        """Create or replace a slice (ADDED or MODIFIED); ``quiet``: no event."""
        with self._cond:
            obj = copy.deepcopy(obj)
            name = obj["metadata"]["name"]
            kind = "MODIFIED" if name in self._slices else "ADDED"
            self._version += 1
            obj["metadata"]["namespace"] = self.namespace
            obj["metadata"]["resourceVersion"] = str(self._version)
            self._slices[name] = obj
            if not quiet:
                self._events.append((self._version, kind, copy.deepcopy(obj)))
            self._cond.notify_all()

    def delete(self, name: str, quiet: bool = False) -> None:
        """Delete a slice (DELETED, with the object's last state); ``quiet``: no event."""
        with self._cond:
            obj = self._slices.pop(name)
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            if not quiet:
                self._events.append((self._version, "DELETED", obj))
            self._cond.notify_all()

    def issue_token(
        self, namespace: str, name: str, audiences: tuple[str, ...] = ("cachefs",)
    ) -> str:
        """A new ServiceAccount token of ``namespace/name``, valid for ``audiences``."""
        token = f"sa-{namespace}-{name}-{len(self.tokens)}-" + "x" * 32
        self.tokens[token] = (namespace, name, audiences)
        return token

    def end_watches(self) -> None:
        """Close every open watch stream cleanly (as at its timeoutSeconds)."""
        with self._cond:
            self._ends += 1
            self._cond.notify_all()

    def expire(self) -> None:
        """Forget all history: open watches and watches from older versions get 410."""
        with self._cond:
            self._version += 1
            self._compacted = self._version - 1
            self._events.clear()
            self._expiries += 1
            self._cond.notify_all()

    def count(self, watch: bool) -> int:
        """Requests received: lists (``watch=False``) or watches."""
        with self._cond:
            return sum(1 for r in self.requests if r["watch"] == watch)

    # -- what the handler asks ---------------------------------------------------------

    def _record(self, request: dict[str, Any]) -> None:
        with self._cond:
            self.requests.append(request)

    def _list(self, selector: dict[str, str]) -> dict[str, Any]:
        with self._cond:
            items = [copy.deepcopy(s) for s in self._slices.values() if _matches(s, selector)]
            return {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": str(self._version)},
                "items": items,
            }


def _parse_selector(text: str) -> dict[str, str]:
    """An equality-based label selector (``a=b,c==d``) as a dict; ValueError otherwise."""
    selector = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or not key or "!" in key:
            raise ValueError(f"unsupported selector term {term!r}")
        selector[key.strip()] = value.strip()
    return selector


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: KubeApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _node_name(self, path: str) -> str | None:
        prefix = "/api/v1/nodes/"
        return path[len(prefix) :] if path.startswith(prefix) else None

    def _node(self, name: str) -> dict[str, Any]:
        labels = self.api.nodes[name]
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}

    def do_POST(self) -> None:
        api = self.api
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if urlsplit(self.path).path != "/apis/authentication.k8s.io/v1/tokenreviews":
            self._json(HTTPStatus.NOT_FOUND, _status(404, "NotFound", "not found"))
            return
        spec = body.get("spec") or {}
        with api._cond:
            api.reviews += 1
            issued = api.tokens.get(spec.get("token") or "")
        asked = list(spec.get("audiences") or ())
        status: dict[str, Any] = {"authenticated": False}
        if issued is None:
            status["error"] = "invalid bearer token"
        else:
            namespace, name, audiences = issued
            granted = [a for a in asked if a in audiences] if asked else list(audiences)
            if not granted:
                status["error"] = "token audiences do not match the requested audiences"
            else:
                status = {
                    "authenticated": True,
                    "user": {
                        "username": f"system:serviceaccount:{namespace}:{name}",
                        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                    },
                    "audiences": granted,
                }
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        self._json(HTTPStatus.CREATED, review)

    def do_PATCH(self) -> None:
        api = self.api
        name = self._node_name(urlsplit(self.path).path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with api._cond:
            api.patches.append((name or "", self.headers.get("Content-Type", ""), body))
            refuse = api.refuse_patches > 0
            api.refuse_patches -= int(refuse)
        if refuse:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, _status(503, "Unavailable", "try later"))
            return
        if name is None or name not in api.nodes:
            self._json(HTTPStatus.NOT_FOUND, _status(404, "NotFound", f"node {name} not found"))
            return
        with api._cond:
            for key, value in ((body.get("metadata") or {}).get("labels") or {}).items():
                if value is None:
                    api.nodes[name].pop(key, None)
                else:
                    api.nodes[name][key] = value
            node = self._node(name)
        self._json(HTTPStatus.OK, node)

    def do_GET(self) -> None:
        api = self.api
        url = urlsplit(self.path)
        name = self._node_name(url.path)
        if name is not None:
            api._record({"path": url.path, "query": {}, "watch": False, "authorized": True})
            if name not in api.nodes:
                self._json(HTTPStatus.NOT_FOUND, _status(404, "NotFound", f"node {name}"))
                return
            with api._cond:
                node = self._node(name)
            self._json(HTTPStatus.OK, node)
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        watching = query.get("watch", "").lower() in ("true", "1")
        authorized = api.token is None or (
            self.headers.get("Authorization") == f"Bearer {api.token}"
        )
        api._record({"path": url.path, "query": query, "watch": watching, "authorized": authorized})
        if not authorized:
            self._json(HTTPStatus.UNAUTHORIZED, _status(401, "Unauthorized", "Unauthorized"))
            return
        if url.path != _PATH.format(api.namespace):
            self._json(HTTPStatus.NOT_FOUND, _status(404, "NotFound", "not found"))
            return
        try:
            selector = _parse_selector(query.get("labelSelector", ""))
        except ValueError as e:
            self._json(HTTPStatus.BAD_REQUEST, _status(400, "BadRequest", str(e)))
            return
        if not watching:
            self._json(HTTPStatus.OK, api._list(selector))
            return
        self._watch(selector, query)

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, selector: dict[str, str], query: dict[str, str]) -> None:
        api = self.api
        cond = api._cond
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        with cond:
            version = int(query.get("resourceVersion") or api._version)
            ends, expiries = api._ends, api._expiries
            too_old = version <= api._compacted
            api.open_watches += 1
        try:
            if too_old:
                self._send_gone(version)
            else:
                self._stream(selector, version, ends, expiries, deadline)
            self._chunk(b"")  # the last chunk: the watch ends cleanly
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with cond:
                api.open_watches -= 1

    def _send_gone(self, version: int) -> None:
        message = f"too old resource version: {version} ({self.api._compacted + 1})"
        event = {"type": "ERROR", "object": _status(410, "Expired", message)}
        self._chunk(json.dumps(event).encode() + b"\n")

    def _stream(
        self, selector: dict[str, str], version: int, ends: int, expiries: int, deadline: float
    ) -> None:
        api = self.api
        cond = api._cond
        while True:
            with cond:
                while True:
                    if api._closing or api._ends != ends or time.monotonic() >= deadline:
                        return
                    if api._expiries != expiries:
                        gone = True
                        break
                    pending = [e for e in api._events if e[0] > version]
                    if pending:
                        gone = False
                        break
                    cond.wait(timeout=0.1)
            if gone:
                self._send_gone(version)
                return
            for event_version, kind, obj in pending:
                version = event_version
                if _matches(obj, selector):
                    line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                    self._chunk(line)
