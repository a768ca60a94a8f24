"""A small Kubernetes API server for tests: the official client, pointed at its URL,
reads and writes objects as it would on a cluster.

Served: EndpointSlices (``discovery.k8s.io/v1``, for the membership source), CachedModels
(``cachefs.io/v1alpha1``, namespaced, with a status subresource), Leases
(``coordination.k8s.io/v1``), Node labels (GET, PATCH) and TokenReviews. The first three
are one generic object store (``k8s_store``, ``k8s_resources``) with the verbs get,
list, watch, create, update, patch and delete, following the documented semantics:

* API Concepts (https://kubernetes.io/docs/reference/using-api/api-concepts/): one
  resourceVersion counter over all writes, a string to clients; a list carries the
  version it was read at, and a watch from it (``?watch=true&resourceVersion=N``) streams
  newline-delimited JSON events (ADDED, MODIFIED, DELETED) of each change after N,
  chunked, until ``timeoutSeconds``; a watch without resourceVersion (or "0") first
  sends the current objects as ADDED. With ``allowWatchBookmarks=true`` a BOOKMARK event
  (only ``metadata.resourceVersion``) comes when a test calls ``bookmark()`` (the API
  sends them when it likes). A watch from before the history's compaction (``expire()``)
  gets an ERROR event with a Status of code 410, reason Expired, and must list again.
  A PUT (or a patch naming ``metadata.resourceVersion``) at a stale resourceVersion is
  409 Conflict; a create of a taken name 409 AlreadyExists. Objects leaving or entering
  a watch's labelSelector are DELETED or ADDED events to it, as from the watch cache.
  Label selectors: ``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``; field
  selectors: ``metadata.name`` and ``metadata.namespace`` (what CRDs support)
  (https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/,
  .../field-selectors/).
* Server-Side Apply (https://kubernetes.io/docs/reference/using-api/server-side-apply/):
  ``PATCH`` with ``application/apply-patch+yaml`` needs ``fieldManager``, creates an
  absent object, and records ``metadata.managedFields`` (manager, operation Apply or
  Update, subresource, fieldsV1) per field path. Lists marked ``x-kubernetes-list-type:
  map`` merge item by item on their ``x-kubernetes-list-map-keys`` (CachedModel's
  ``status.nodes`` by name and ``status.conditions`` by type), ``set`` lists by value,
  others (and ``x-kubernetes-map-type: atomic`` maps) whole. Applying a field another
  manager owns with another value is 409 Conflict (causes FieldManagerConflict) unless
  ``force=true``, which takes it over; the same value shares it. A field the manager
  applied before and leaves out is removed, unless another manager owns it. Other writes
  (operation Update) give their manager the fields they change. A write that changes
  nothing is no write: no new resourceVersion, no event.
* The status subresource (https://kubernetes.io/docs/tasks/extend-kubernetes/
  custom-resources/custom-resource-definitions/#status-subresource): writes to
  ``.../status`` change only status; writes to the object itself (create included) keep
  the stored status; metadata.generation counts changes of everything but metadata and
  status. CRs refuse a PUT without metadata.resourceVersion (422, as
  ``AllowUnconditionalUpdate`` is false for them) and strategic merge patches (415).
* Finalizers (https://kubernetes.io/docs/concepts/overview/working-with-objects/
  finalizers/, https://kubernetes.io/docs/concepts/architecture/garbage-collection/):
  DELETE of an object with finalizers sets deletionTimestamp (and
  deletionGracePeriodSeconds 0, and bumps generation, as the registry's
  ``markAsDeleting`` does) and answers with the object (a MODIFIED event); the object
  goes (DELETED) when a write leaves its finalizers empty. Adding a finalizer to it then
  is 422 Invalid, a FieldValueForbidden cause on metadata.finalizers, as the API's
  ``ValidateNoNewFinalizers`` answers. Without finalizers DELETE removes the object and
  answers a Status of Success. DeleteOptions' preconditions (uid, resourceVersion) hold.
* Leases (https://kubernetes.io/docs/concepts/architecture/leases/): a plain resource
  (spec.holderIdentity, leaseDurationSeconds, acquireTime, renewTime,
  leaseTransitions, not checked) with the create and update conflicts above.
* CRDs given as ``crds=[...]`` are served in their served versions (one of CachedModels
  replaces the built-in one): list types from the schema's markers; unknown fields
  pruned (a ``Warning`` header, or 400 with ``fieldValidation=Strict``), nulls pruned
  where not ``nullable``, ``default`` values set, and the object checked against
  ``openAPIV3Schema`` with ``jsonschema`` where installed: 422 Invalid naming each
  field, as the API does
  (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
  custom-resource-definitions/#validation, #field-pruning, #defaulting).
* Merge patch is RFC 7386, JSON patch RFC 6902.

Simpler than the API: no namespaces as objects (any namespace exists), no
authorization beyond one bearer token, no ``limit``/``continue`` paging (a list is
whole), no list at an exact past resourceVersion (``resourceVersionMatch`` and
``sendInitialEvents`` are ignored; a watch from a future version just waits), no dryRun
(refused), no CEL ``x-kubernetes-validations``, no ``format`` checks, no conversion
between versions, no garbage collection of dependents (ownerReferences are kept, not
acted on); a strategic merge patch of a built-in type is a merge patch, and
managedFields in request bodies are ignored. fieldsV1 lists owned leaves (and ``.`` for
list items), not every intermediate map.

A test reads and changes the store directly too (``create``, ``put``, ``get``,
``objects``, ``events``), counts requests (``count``, ``calls``), makes requests fail
(``refuse_next``), ends watches, expires history and sends bookmarks.

TokenReview (authentication.k8s.io/v1): ``spec.token`` and ``spec.audiences`` in;
``status.authenticated``, ``status.user.username``
(``system:serviceaccount:<namespace>:<name>``) and ``status.audiences`` (those asked
that the token is valid for; none: not authenticated, with ``status.error``) out.
A test issues tokens with ``issue_token``.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from k8s_resources import (
    APPLY,
    CACHED_MODELS,
    ENDPOINT_SLICES,
    LEASES,
    REASONS,
    ApiError,
    Resource,
    Selector,
    bad_request,
    crd_resources,
)
from k8s_store import Event, Store

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
_NODES = "/api/v1/nodes/"
_ROUTE = re.compile(
    r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<subresource>[^/]+))?)?"
)


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


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a node killed mid-watch) is no error of the API."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class KubeApiServer:
    """``with KubeApiServer("ns") as api``: ``api.url`` is the API server's address;
    ``namespace`` is where ``put`` and ``create`` write objects that name none."""

    def __init__(
        self,
        namespace: str,
        token: str | None = None,
        crds: list[dict[str, Any]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.token = token
        resources = [ENDPOINT_SLICES, CACHED_MODELS, LEASES]
        for crd in crds or ():
            resources += crd_resources(crd)  # the same names: these replace the built-in
        self.store = Store(resources)
        self._cond = self.store.cond
        # Each request: path, query, watch, authorized, verb, plural.
        self.requests: list[dict[str, Any]] = []
        self._refusals: list[list[Any]] = []  # [verb, plural or None, code, left]
        self._ends = 0  # bumped to end open watches
        self._expiries = 0  # bumped to send open watches 410
        self._bookmarks = 0  # bumped to send open watches a BOOKMARK
        self._closing = False
        self.open_watches = 0
        self.nodes: dict[str, dict[str, str]] = {}  # Node name -> its labels
        self.patches: list[tuple[str, str, dict[str, Any]]] = []  # name, content type, body
        self.refuse_patches = 0  # answer the next N node patches with 503
        # Issued ServiceAccount tokens: token -> (namespace, name, audiences)
        self.tokens: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        self.reviews = 0  # TokenReviews answered
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = _Server(("127.0.0.1", 0), handler)
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

    def put(self, obj: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
        """Create or replace an object as given, without the API's checks (as a write to
        etcd would): ADDED or MODIFIED; ``quiet``: no event, as if lost to compaction."""
        return self.store.put(obj, self.namespace, quiet=quiet)

    def delete(
        self,
        name: str,
        quiet: bool = False,
        plural: str = "endpointslices",
        namespace: str | None = None,
    ) -> None:
        """Remove an object at once, finalizers or not (DELETED); ``quiet``: no event."""
        res = self.store.by_plural(plural)
        self.store.remove_direct(res, namespace or self.namespace, name, quiet=quiet)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object as a POST would (its namespace, else the server's)."""
        res = self.store.resource_for(obj["apiVersion"], obj["kind"])
        namespace = (obj.get("metadata") or {}).get("namespace") or self.namespace
        return self.store.create(res, namespace, obj, manager="test")[0]

    def get(self, namespace: str, name: str, plural: str = "cachedmodels") -> dict | None:
        """The object as a GET shows it, or None."""
        try:
            return self.store.get(self.store.by_plural(plural), namespace, name)
        except ApiError:
            return None

    def objects(self, plural: str = "cachedmodels") -> list[dict[str, Any]]:
        """Every object of the resource, in every namespace."""
        res = self.store.by_plural(plural)
        with self._cond:
            return [self.store.render(res, rec) for rec in self.store.records(res, None)]

    def events(self, plural: str = "cachedmodels") -> list[tuple[str, dict[str, Any]]]:
        """(type, object) of every change of the resource so far, expired ones included."""
        with self._cond:
            log = [e for e in self.store.log if e.resource.plural == plural]
            return [(e.type, copy.deepcopy(e.obj)) for e in log]

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
            self.store.expire()
            self._expiries += 1
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Send each open watch that allows bookmarks a BOOKMARK at the current version."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    def refuse_next(self, verb: str, code: int, n: int = 1, plural: str | None = None) -> None:
        """Answer the next ``n`` requests of ``verb`` (get, list, watch, create, update,
        patch, delete; of ``plural``, or any) with ``code`` and its Status."""
        with self._cond:
            self._refusals.append([verb, plural, code, n])

    def count(self, watch: bool) -> int:
        """Requests received: reads (get and list, ``watch=False``) or watches."""
        verbs = ("watch",) if watch else ("get", "list")
        with self._cond:
            return sum(1 for r in self.requests if r.get("verb") in verbs)

    def calls(self, plural: str | None = None) -> Counter[str]:
        """Requests received by verb (of ``plural``, or all)."""
        with self._cond:
            return Counter(r["verb"] for r in self.requests if plural in (None, r["plural"]))

    # -- what the handler asks -----------------------------------------------------

    def _record(self, request: dict[str, Any]) -> None:
        with self._cond:
            self.requests.append(request)

    def _refused(self, verb: str, plural: str) -> int | None:
        with self._cond:
            for refusal in self._refusals:
                if refusal[0] == verb and refusal[1] in (None, plural) and refusal[3] > 0:
                    refusal[3] -= 1
                    return int(refusal[2])
        return None


def _decode(data: bytes, as_yaml: bool = False) -> Any:
    try:
        return yaml.safe_load(data) if as_yaml else json.loads(data or b"null")
    except (ValueError, yaml.YAMLError) as exc:
        raise bad_request(f"the body cannot be decoded: {exc}") from exc


def _transition(event: Event, selector: Selector) -> str | None:
    """What a watch with ``selector`` sees of ``event``: leaving it is DELETED, entering
    it ADDED, as the watch cache does."""
    now = selector.matches(event.obj)
    if event.type != "MODIFIED":
        return event.type if now else None
    before = selector.matches(event.old)
    if before and now:
        return "MODIFIED"
    return "ADDED" if now else "DELETED" if before else None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: KubeApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if method == "POST" and url.path == _TOKEN_REVIEWS:
                self._token_review(_decode(data) or {})
            elif url.path.startswith(_NODES):
                self._node(method, url.path, data)
            else:
                self._resource(method, url.path, query, data)
        except ApiError as e:
            self._json(e.code, e.status())

    # -- the generic resources -----------------------------------------------------

    def _resource(self, method: str, path: str, query: dict[str, str], data: bytes) -> None:
        api, store = self.api, self.api.store
        m = _ROUTE.fullmatch(path)
        res = m and store.resource(m["group"] or "", m["version"] or m["core"], m["plural"])
        namespace, name, sub = (m["namespace"], m["name"], m["subresource"]) if m else ("",) * 3
        watching = query.get("watch", "").lower() in ("true", "1")
        verb = {
            "GET": "get" if name else "watch" if watching else "list",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }[method]
        authorized = api.token is None or (
            self.headers.get("Authorization") == f"Bearer {api.token}"
        )
        plural = res.plural if res else None
        api._record(
            {
                "path": path,
                "query": query,
                "watch": verb == "watch",
                "authorized": authorized,
                "verb": verb,
                "plural": plural,
            }
        )
        if not authorized:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        self._check_route(res, verb, namespace, name, sub)
        assert res is not None
        code = api._refused(verb, res.plural)
        if code is not None:
            raise ApiError(code, REASONS.get(code, "Unknown"), f"refused by the test ({code})")
        if "dryRun" in query:
            raise bad_request("dryRun is not supported by this stand-in")
        namespace, sub = namespace or "", sub or ""
        validation = query.get("fieldValidation") or "Warn"
        manager = query.get("fieldManager") or self._default_manager()
        if verb == "get":
            self._json(HTTPStatus.OK, store.get(res, namespace, name))
            return
        if verb in ("list", "watch"):
            selector = Selector.parse(
                query.get("labelSelector", ""), query.get("fieldSelector", "")
            )
            if verb == "list":
                self._json(HTTPStatus.OK, store.list(res, namespace or None, selector))
            else:
                self._watch(res, namespace or None, selector, query)
            return
        if verb == "create":
            obj, warnings = store.create(res, namespace, _decode(data), manager, validation)
            self._json(HTTPStatus.CREATED, obj, warnings)
        elif verb == "update":
            body = _decode(data)
            obj, warnings = store.update(res, namespace, name, body, manager, sub, validation)
            self._json(HTTPStatus.OK, obj, warnings)
        elif verb == "patch":
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            body = _decode(data, as_yaml=content_type == APPLY)
            if content_type == APPLY:
                manager = query.get("fieldManager") or ""
            force = query.get("force", "").lower() in ("true", "1")
            obj, warnings, created = store.patch(
                res, namespace, name, content_type, body, manager, sub, force, validation
            )
            self._json(HTTPStatus.CREATED if created else HTTPStatus.OK, obj, warnings)
        else:
            options = _decode(data) if data.strip() else {}
            body, _ = store.delete(res, namespace, name, options)
            self._json(HTTPStatus.OK, body)

    def _check_route(
        self, res: Resource | None, verb: str, namespace: str, name: str, sub: str
    ) -> None:
        """404 for what is not served here, 405 for a verb the path does not take."""
        if (
            res is None
            or (sub and (sub != "status" or not res.status))
            or (namespace and not res.namespaced)
            or (res.namespaced and not namespace and verb not in ("list", "watch"))
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if (verb == "create" and name) or (verb in ("update", "patch", "delete") and not name):
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not allowed on this path")
        if sub and verb not in ("get", "update", "patch"):
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not allowed on {sub}")

    def _default_manager(self) -> str:
        """The manager of a write that names none: the client's User-Agent up to '/'."""
        return (self.headers.get("User-Agent") or "unknown").split("/")[0][:128]

    # -- watches ---------------------------------------------------------------------

    def _watch(
        self, res: Resource, namespace: str | None, selector: Selector, query: dict[str, str]
    ) -> None:
        api, store = self.api, self.api.store
        start = query.get("resourceVersion") or ""
        if start not in ("", "0") and not start.isdigit():
            raise bad_request(f"invalid resourceVersion {start!r}")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        with store.cond:
            marks = (api._ends, api._expiries, api._bookmarks)
            initial: list[dict[str, Any]] = []
            if start in ("", "0"):  # the current objects first, then what follows
                version = store.version
                current = (store.render(res, rec) for rec in store.records(res, namespace))
                initial = [obj for obj in current if selector.matches(obj)]
            else:
                version = int(start)
            too_old = version <= store.compacted
            api.open_watches += 1
        try:
            if too_old:
                self._send_gone(version)
            else:
                for obj in initial:
                    self._send("ADDED", obj)
                self._stream(res, namespace, selector, version, marks, deadline, bookmarks)
            self._chunk(b"")  # the last chunk: the watch ends cleanly
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with store.cond:
                api.open_watches -= 1

    def _stream(
        self,
        res: Resource,
        namespace: str | None,
        selector: Selector,
        version: int,
        marks: tuple[int, int, int],
        deadline: float,
        bookmarks: bool,
    ) -> None:
        api, store = self.api, self.api.store
        ends, expiries, marked = marks
        while True:
            with store.cond:
                while True:
                    if api._closing or api._ends != ends or time.monotonic() >= deadline:
                        return
                    if api._expiries != expiries:
                        self._send_gone(version)
                        return
                    pending = store.pending(res, namespace, version)
                    bookmark = bookmarks and api._bookmarks != marked
                    marked = api._bookmarks
                    if pending or bookmark:
                        head = store.version
                        break
                    store.cond.wait(timeout=0.1)
            for event in pending:
                version = event.version
                kind = _transition(event, selector)
                if kind:
                    self._send(kind, event.obj)
            if bookmark:  # every event up to head was pending
                version = head
                meta = {"resourceVersion": str(head)}
                self._send(
                    "BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}
                )

    def _send(self, kind: str, obj: dict[str, Any]) -> None:
        self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def _send_gone(self, version: int) -> None:
        message = f"too old resource version: {version} ({self.api.store.compacted + 1})"
        self._send("ERROR", ApiError(410, "Expired", message).status())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any], warnings: Iterable[str] = ()) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for warning in warnings:
            self.send_header("Warning", f"299 - {json.dumps(warning)}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # -- Nodes and TokenReviews ------------------------------------------------------

    def _node(self, method: str, path: str, data: bytes) -> None:
        api = self.api
        name = path[len(_NODES) :]
        verb = "get" if method == "GET" else "patch"
        request = {"path": path, "query": {}, "watch": False, "authorized": True}
        api._record({**request, "verb": verb, "plural": "nodes"})
        if method == "PATCH":
            body = _decode(data) or {}
            with api._cond:
                api.patches.append((name, self.headers.get("Content-Type", ""), body))
                refuse = api.refuse_patches > 0
                api.refuse_patches -= int(refuse)
            if refuse:
                raise ApiError(503, "ServiceUnavailable", "try later")
        elif method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not served for nodes")
        code = api._refused(verb, "nodes")
        if code is not None:
            raise ApiError(code, REASONS.get(code, "Unknown"), f"refused by the test ({code})")
        with api._cond:
            if name not in api.nodes:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found')
            if method == "PATCH":
                for key, value in ((body.get("metadata") or {}).get("labels") or {}).items():
                    if value is None:
                        api.nodes[name].pop(key, None)
                    else:
                        api.nodes[name][key] = value
            meta = {"name": name, "labels": dict(api.nodes[name])}
        self._json(HTTPStatus.OK, {"apiVersion": "v1", "kind": "Node", "metadata": meta})

    def _token_review(self, body: dict[str, Any]) -> None:
        api = self.api
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
