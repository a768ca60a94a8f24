"""The Kubernetes API stand-in (``k8s_api``) held to the API's documented behaviour.

Each test talks to it as a controller would: the official client's CustomObjectsApi
and CoordinationV1Api, configured by ``api_client`` as the node configures them, and
plain HTTP where the client cannot say it (a watch read event by event, from a chosen
resourceVersion). The module docstring of ``k8s_api`` cites the rules checked here.
"""

from __future__ import annotations

import datetime
import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from k8s_api import KubeApiServer
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from cachefs.node.kube import api_client

GROUP, VERSION, PLURAL, KIND = "cachefs.io", "v1alpha1", "cachedmodels", "CachedModel"
NS = "team-a"
APPLY = "application/apply-patch+yaml"
JSON_PATCH = "application/json-patch+json"
FINALIZER = "cachefs.io/unpin"
MODELS = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(NS) as server:
        yield server


@pytest.fixture
def objects(api: KubeApiServer) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client(api.url))


def _model(name: str, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": labels or {}}
    metadata.update(extra.pop("metadata", {}))
    spec = {"source": f"s3://models/{name}/", **extra.pop("spec", {})}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}


def _create(objects: client.CustomObjectsApi, obj: dict[str, Any]) -> dict[str, Any]:
    return objects.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, obj)


def _get(objects: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    return objects.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _merge(objects: client.CustomObjectsApi, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return objects.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, patch)


def _apply_status(
    objects: client.CustomObjectsApi,
    name: str,
    manager: str,
    status: dict[str, Any],
    force: bool = False,
) -> dict[str, Any]:
    """Server-side apply of ``status`` by ``manager``, as each node reports its entry."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "status": status,
    }
    return objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, name, body, field_manager=manager, force=force,
        _content_type=APPLY,
    )  # fmt: skip


def _refused(call: Any, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """The status code and Status body of a call the API refuses."""
    with pytest.raises(ApiException) as caught:
        call(*args, **kwargs)
    return caught.value.status, json.loads(caught.value.body or "{}")


def _managers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["manager"]: m for m in obj["metadata"].get("managedFields") or ()}


class _Watch:
    """A watch over plain HTTP, read one event at a time (a stuck read fails the test)."""

    def __init__(self, api: KubeApiServer, path: str, **query: str) -> None:
        url = urlsplit(api.url)
        self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        self._conn.request("GET", f"{path}?{urlencode({'watch': 'true', **query})}")
        self._response = self._conn.getresponse()
        assert self._response.status == 200

    def next(self) -> dict[str, Any] | None:
        """The next event; None when the server ended the watch."""
        line = self._response.readline()
        return json.loads(line) if line.strip() else None

    def close(self) -> None:
        self._conn.close()


def _names(listed: dict[str, Any]) -> list[str]:
    return [item["metadata"]["name"] for item in listed["items"]]


# -- list and watch ---------------------------------------------------------------------


def test_a_watch_from_a_lists_version_sees_each_later_change_then_a_bookmark(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    _create(objects, _model("a"))
    listed = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert _names(listed) == ["a"]
    assert listed["kind"] == "CachedModelList"
    since = listed["metadata"]["resourceVersion"]
    assert isinstance(since, str)

    _create(objects, _model("b"))
    _merge(objects, "a", {"spec": {"revision": "v2"}})
    objects.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "b")

    seen = []
    stream = watch.Watch().stream(
        objects.list_cluster_custom_object,
        GROUP,
        VERSION,
        PLURAL,
        resource_version=since,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    for event in stream:  # ends when the server ends the watch
        obj = event["raw_object"]
        seen.append(
            (event["type"], obj["metadata"].get("name"), obj["metadata"]["resourceVersion"])
        )
        if len(seen) == 3:
            api.bookmark()
        if event["type"] == "BOOKMARK":
            assert set(obj) == {"kind", "apiVersion", "metadata"}
            api.end_watches()
    assert [(kind, name) for kind, name, _ in seen] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
        ("BOOKMARK", None),
    ]
    versions = [int(version) for _, _, version in seen]
    assert int(since) < versions[0] < versions[1] < versions[2] <= versions[3]
    latest = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)["metadata"]
    assert seen[3][2] == latest["resourceVersion"]
    assert api.count(watch=True) == 1


def test_a_watch_without_a_version_starts_with_the_current_objects(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    _create(objects, _model("a"))
    _create(objects, _model("b"))
    stream = _Watch(api, MODELS, timeoutSeconds="30")
    try:
        first = [stream.next(), stream.next()]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in first] == [
            ("ADDED", "a"),
            ("ADDED", "b"),
        ]
        _create(objects, _model("c"))
        event = stream.next()
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "c")
        api.end_watches()
        assert stream.next() is None  # ended cleanly: the last chunk
    finally:
        stream.close()


def test_an_expired_version_is_410_gone_and_a_new_list_recovers(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    since = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)["metadata"]
    _create(objects, _model("a"))
    api.expire()

    stream = _Watch(api, MODELS, resourceVersion=since["resourceVersion"])
    try:
        event = stream.next()
        assert event["type"] == "ERROR"
        assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
        assert stream.next() is None
    finally:
        stream.close()
    # The client turns it into an ApiException of status 410.
    with pytest.raises(ApiException) as caught:
        for _ in watch.Watch().stream(
            objects.list_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            resource_version=since["resourceVersion"],
            timeout_seconds=30,
        ):
            pass
    assert caught.value.status == 410

    # A new list has what the lost events said, and a version to watch from.
    listed = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert _names(listed) == ["a"]
    stream = _Watch(api, MODELS, resourceVersion=listed["metadata"]["resourceVersion"])
    try:
        _create(objects, _model("b"))
        event = stream.next()
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "b")
        api.expire()  # an open watch is told too
        event = stream.next()
        assert (event["type"], event["object"]["code"]) == ("ERROR", 410)
    finally:
        stream.close()


def test_selectors_filter_lists_and_watches(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    _create(objects, _model("a", {"pool": "gpu"}))
    _create(objects, _model("b", {"pool": "cpu"}))
    _create(objects, _model("c"))
    other = _model("d", {"pool": "gpu"}, metadata={"namespace": "team-b"})
    objects.create_namespaced_custom_object(GROUP, VERSION, "team-b", PLURAL, other)

    def names(**selector: str) -> list[str]:
        return _names(objects.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, **selector))

    assert names(label_selector="pool=gpu") == ["a"]
    assert names(label_selector="pool in (gpu, cpu)") == ["a", "b"]
    assert names(label_selector="pool notin (gpu)") == ["b", "c"]
    assert names(label_selector="pool!=gpu") == ["b", "c"]
    assert names(label_selector="!pool") == ["c"]
    assert names(label_selector="pool") == ["a", "b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    everywhere = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert _names(everywhere) == ["a", "b", "c", "d"]
    code, body = _refused(
        objects.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
        field_selector="spec.source=x",
    )  # fmt: skip
    assert (code, body["reason"]) == (400, "BadRequest")

    # An object that comes into a watch's selector is ADDED to it, one that leaves DELETED.
    since = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)["metadata"]
    stream = _Watch(api, MODELS, resourceVersion=since["resourceVersion"], labelSelector="pool=gpu")
    try:
        _merge(objects, "b", {"metadata": {"labels": {"pool": "gpu"}}})
        _merge(objects, "a", {"metadata": {"labels": {"pool": "cpu"}}})
        _merge(objects, "c", {"metadata": {"labels": {"other": "x"}}})  # not seen
        _merge(objects, "b", {"spec": {"revision": "r2"}})
        seen = [stream.next() for _ in range(3)]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in seen] == [
            ("ADDED", "b"),
            ("DELETED", "a"),
            ("MODIFIED", "b"),
        ]
    finally:
        stream.close()


# -- create and update ------------------------------------------------------------------


def test_a_write_at_a_stale_version_is_a_conflict(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    created = _create(objects, _model("a"))
    meta = created["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
    code, body = _refused(_create, objects, _model("a"))
    assert (code, body["reason"]) == (409, "AlreadyExists")

    _merge(objects, "a", {"metadata": {"labels": {"seen": "yes"}}})
    stale = dict(created, spec={**created["spec"], "revision": "r1"})
    code, body = _refused(
        objects.replace_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "a", stale
    )
    assert (code, body["reason"]) == (409, "Conflict")
    assert "the object has been modified" in body["message"]
    # A patch that names the version it read is held to it too.
    code, _ = _refused(
        _merge, objects, "a", {"metadata": {"resourceVersion": meta["resourceVersion"]}}
    )
    assert code == 409

    fresh = _get(objects, "a")
    fresh["spec"]["revision"] = "r1"
    replaced = objects.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", fresh)
    assert replaced["spec"]["revision"] == "r1"
    assert int(replaced["metadata"]["resourceVersion"]) > int(fresh["metadata"]["resourceVersion"])
    assert replaced["metadata"]["labels"] == {"seen": "yes"}
    # A custom resource is never replaced blind: a PUT must name a resourceVersion.
    del fresh["metadata"]["resourceVersion"]
    code, body = _refused(
        objects.replace_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "a", fresh
    )
    assert (code, body["reason"]) == (422, "Invalid")
    assert body["details"]["causes"][0]["field"] == "metadata.resourceVersion"


def test_a_write_that_changes_nothing_is_no_new_version(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    created = _create(objects, _model("a"))
    same = _merge(objects, "a", {"spec": {"source": created["spec"]["source"]}})
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert [kind for kind, _ in api.events()] == ["ADDED"]


# -- server-side apply ------------------------------------------------------------------


def test_two_managers_apply_their_own_entries_of_a_list_map(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    _create(objects, _model("a"))
    _apply_status(objects, "a", "node-a", {"nodes": [{"name": "node-a", "phase": "Filling"}]})
    _apply_status(objects, "a", "node-b", {"nodes": [{"name": "node-b", "phase": "Ready"}]})
    obj = _get(objects, "a")
    assert {e["name"]: e["phase"] for e in obj["status"]["nodes"]} == {
        "node-a": "Filling",
        "node-b": "Ready",
    }
    managers = _managers(obj)
    for node in ("node-a", "node-b"):
        entry = managers[node]
        assert (entry["operation"], entry["subresource"]) == ("Apply", "status")
        assert entry["fieldsType"] == "FieldsV1"
        owned = entry["fieldsV1"]["f:status"]["f:nodes"]
        assert list(owned) == [f'k:{{"name":"{node}"}}']
        assert set(owned[f'k:{{"name":"{node}"}}']) == {".", "f:name", "f:phase"}

    # Each changes its own entry; the other's stays.
    _apply_status(
        objects, "a", "node-a", {"nodes": [{"name": "node-a", "phase": "Ready", "version": "v1"}]}
    )
    again = _apply_status(
        objects, "a", "node-a", {"nodes": [{"name": "node-a", "phase": "Ready", "version": "v1"}]}
    )
    entries = {e["name"]: e for e in again["status"]["nodes"]}
    assert entries["node-a"] == {"name": "node-a", "phase": "Ready", "version": "v1"}
    assert entries["node-b"] == {"name": "node-b", "phase": "Ready"}

    # An entry left out of an apply goes: node-a's, never node-b's.
    _apply_status(objects, "a", "node-a", {"nodes": [{"name": "node-a", "phase": "Draining"}]})
    left = _get(objects, "a")["status"]["nodes"]
    assert {e["name"]: e for e in left}["node-a"] == {"name": "node-a", "phase": "Draining"}
    gone = _apply_status(objects, "a", "node-a", {"nodes": []})
    assert gone["status"]["nodes"] == [{"name": "node-b", "phase": "Ready"}]
    assert _get(objects, "a")["metadata"]["generation"] == 1  # status is not the spec


def test_applying_a_field_another_manager_owns_conflicts_unless_forced(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    _create(objects, _model("a"))
    _apply_status(objects, "a", "leader-1", {"readyNodes": 1, "ready": "1/2"})

    code, body = _refused(_apply_status, objects, "a", "leader-2", {"readyNodes": 2})
    assert (code, body["reason"]) == (409, "Conflict")
    (cause,) = body["details"]["causes"]
    assert cause["reason"] == "FieldManagerConflict"
    assert cause["field"] == ".status.readyNodes"
    assert '"leader-1"' in cause["message"]
    assert _get(objects, "a")["status"]["readyNodes"] == 1  # nothing written

    # The same value is no conflict: both own it.
    _apply_status(objects, "a", "leader-2", {"readyNodes": 1})
    # Forced: leader-2 takes the field from leader-1, which keeps the rest.
    forced = _apply_status(objects, "a", "leader-2", {"readyNodes": 2}, force=True)
    assert forced["status"] == {"readyNodes": 2, "ready": "1/2"}
    managers = _managers(forced)
    assert set(managers["leader-1"]["fieldsV1"]["f:status"]) == {"f:ready"}
    assert set(managers["leader-2"]["fieldsV1"]["f:status"]) == {"f:readyNodes"}
    # No longer its field: leader-1 leaving it out removes nothing.
    after = _apply_status(objects, "a", "leader-1", {"ready": "2/2"})
    assert after["status"] == {"readyNodes": 2, "ready": "2/2"}

    # An apply needs a field manager.
    code, body = _refused(
        objects.patch_namespaced_custom_object_status, GROUP, VERSION, NS, PLURAL, "a",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "status": {}}, _content_type=APPLY,
    )  # fmt: skip
    assert code == 400


def test_an_apply_creates_and_removes_the_fields_its_manager_left_out(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    _, code, _ = objects.patch_namespaced_custom_object_with_http_info(
        GROUP, VERSION, NS, PLURAL, "a",
        _model("a", spec={"revision": "r1", "tier": "fast"}, metadata={"finalizers": [FINALIZER]}),
        field_manager="gitops", _content_type=APPLY,
    )  # fmt: skip
    assert code == 201  # created
    assert _get(objects, "a")["metadata"]["finalizers"] == [FINALIZER]
    # Another writer's field (an Update) is not the applier's to remove.
    _merge(objects, "a", {"spec": {"pin": False}})

    again = objects.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "a", _model("a", spec={"tier": "fast"}),
        field_manager="gitops", _content_type=APPLY,
    )  # fmt: skip
    assert again["spec"] == {"source": "s3://models/a/", "tier": "fast", "pin": False}
    assert again["metadata"].get("finalizers") is None  # left out: removed too
    assert again["metadata"]["generation"] == 3
    operations = {(m["manager"], m["operation"]) for m in again["metadata"]["managedFields"]}
    assert operations == {("gitops", "Apply"), ("OpenAPI-Generator", "Update")}


# -- the status subresource -------------------------------------------------------------


def test_the_status_subresource_and_the_object_write_apart(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    created = _create(objects, {**_model("a"), "status": {"ready": "9/9"}})
    assert "status" not in created  # a create does not set status
    assert created["metadata"]["generation"] == 1

    # A status write changes status only; generation stays.
    obj = _get(objects, "a")
    obj["status"] = {"ready": "1/2"}
    obj["spec"]["tier"] = "ignored"
    written = objects.replace_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "a", obj)
    assert written["status"] == {"ready": "1/2"}
    assert "tier" not in written["spec"]
    assert written["metadata"]["generation"] == 1
    patched = objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "a", {"status": {"size": "1 GiB"}, "spec": {"tier": "no"}}
    )
    assert patched["status"] == {"ready": "1/2", "size": "1 GiB"}
    assert "tier" not in patched["spec"]
    assert patched["metadata"]["generation"] == 1

    # A write of the object keeps the stored status; a spec change is a new generation.
    obj = _get(objects, "a")
    obj["status"] = {"ready": "0/0"}
    obj["spec"]["tier"] = "fast"
    replaced = objects.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", obj)
    assert replaced["status"] == {"ready": "1/2", "size": "1 GiB"}
    assert replaced["spec"]["tier"] == "fast"
    assert replaced["metadata"]["generation"] == 2
    # Metadata is not the spec either.
    labelled = _merge(objects, "a", {"metadata": {"labels": {"team": "a"}}})
    assert labelled["metadata"]["generation"] == 2


# -- finalizers -------------------------------------------------------------------------


def test_finalizers_hold_a_deleted_object_until_the_last_goes(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    created = _create(objects, _model("a", metadata={"finalizers": [FINALIZER]}))
    stream = _Watch(api, MODELS, resourceVersion=created["metadata"]["resourceVersion"])
    try:
        marked = objects.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a")
        assert marked["metadata"]["deletionTimestamp"]
        assert marked["metadata"]["generation"] == 2  # as the registry marks it
        event = stream.next()
        assert event["type"] == "MODIFIED"
        assert event["object"]["metadata"]["deletionTimestamp"]
        still = _get(objects, "a")
        assert still["metadata"]["finalizers"] == [FINALIZER]

        # No new finalizer while it is being deleted.
        code, body = _refused(
            _merge, objects, "a", {"metadata": {"finalizers": [FINALIZER, "other.io/x"]}}
        )
        assert (code, body["reason"]) == (422, "Invalid")
        (cause,) = body["details"]["causes"]
        assert (cause["field"], cause["reason"]) == ("metadata.finalizers", "FieldValueForbidden")
        # Deleting again changes nothing.
        objects.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a")

        # The last finalizer goes (a JSON patch, tested against what was read): so does it.
        ops = [
            {"op": "test", "path": "/metadata/finalizers", "value": [FINALIZER]},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ]
        objects.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "a", ops, _content_type=JSON_PATCH
        )
        event = stream.next()
        assert (event["type"], event["object"]["metadata"]["name"]) == ("DELETED", "a")
    finally:
        stream.close()
    code, body = _refused(_get, objects, "a")
    assert (code, body["reason"]) == (404, "NotFound")
    assert [kind for kind, _ in api.events()] == ["ADDED", "MODIFIED", "DELETED"]

    # Without finalizers a delete removes the object at once.
    _create(objects, _model("b"))
    answer = objects.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "b")
    assert (answer["kind"], answer["status"]) == ("Status", "Success")
    assert api.get(NS, "b") is None


# -- leases -----------------------------------------------------------------------------


def test_a_lease_is_created_once_and_replaced_only_at_its_version(api: KubeApiServer) -> None:
    leases = client.CoordinationV1Api(api_client(api.url))
    now = datetime.datetime.now(datetime.timezone.utc)
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name="cachefs-models", namespace=NS),
        spec=client.V1LeaseSpec(
            holder_identity="node-a",
            lease_duration_seconds=15,
            acquire_time=now,
            renew_time=now,
            lease_transitions=0,
        ),
    )
    created = leases.create_namespaced_lease(NS, lease)
    assert created.spec.holder_identity == "node-a"
    assert created.metadata.resource_version
    code, body = _refused(leases.create_namespaced_lease, NS, lease)
    assert (code, body["reason"]) == (409, "AlreadyExists")

    # node-b takes it over at the version it read...
    read = leases.read_namespaced_lease("cachefs-models", NS)
    read.spec.holder_identity = "node-b"
    read.spec.lease_transitions = 1
    taken = leases.replace_namespaced_lease("cachefs-models", NS, read)
    assert (taken.spec.holder_identity, taken.spec.lease_transitions) == ("node-b", 1)
    # ...and node-a, renewing from what it read before, loses.
    created.spec.renew_time = datetime.datetime.now(datetime.timezone.utc)
    code, body = _refused(leases.replace_namespaced_lease, "cachefs-models", NS, created)
    assert (code, body["reason"]) == (409, "Conflict")
    assert leases.read_namespaced_lease("cachefs-models", NS).spec.holder_identity == "node-b"


# -- what a test injects ----------------------------------------------------------------


def test_refusals_answer_the_next_requests_then_the_api_answers_again(
    api: KubeApiServer, objects: client.CustomObjectsApi
) -> None:
    _create(objects, _model("a"))
    api.refuse_next("patch", 503, n=2, plural=PLURAL)
    api.refuse_next("list", 500)
    for _ in range(2):
        code, body = _refused(_merge, objects, "a", {"spec": {"tier": "x"}})
        assert (code, body["reason"]) == (503, "ServiceUnavailable")
    assert _merge(objects, "a", {"spec": {"tier": "x"}})["spec"]["tier"] == "x"
    code, _ = _refused(objects.list_cluster_custom_object, GROUP, VERSION, PLURAL)
    assert code == 500
    assert _names(objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)) == ["a"]
    calls = api.calls(PLURAL)
    assert (calls["create"], calls["patch"], calls["list"]) == (1, 3, 2)


# -- a CRD's schema ---------------------------------------------------------------------

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": KIND, "plural": PLURAL, "singular": "cachedmodel"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["source"],
                                "properties": {
                                    "source": {"type": "string", "pattern": "^s3://"},
                                    "updatePolicy": {
                                        "type": "string",
                                        "enum": ["Pinned", "Latest"],
                                        "default": "Pinned",
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "nodes": {
                                        "type": "array",
                                        "x-kubernetes-list-type": "map",
                                        "x-kubernetes-list-map-keys": ["name"],
                                        "items": {
                                            "type": "object",
                                            "required": ["name"],
                                            "properties": {
                                                "name": {"type": "string"},
                                                "bytesDone": {"type": "integer"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_a_crd_prunes_unknown_fields_and_sets_defaults() -> None:
    with KubeApiServer(NS, crds=[CRD]) as api:
        objects = client.CustomObjectsApi(api_client(api.url))
        created, _, headers = objects.create_namespaced_custom_object_with_http_info(
            GROUP, VERSION, NS, PLURAL, _model("a", spec={"extra": 1})
        )
        assert created["spec"] == {"source": "s3://models/a/", "updatePolicy": "Pinned"}
        assert 'unknown field \\"spec.extra\\"' in headers["Warning"]
        code, body = _refused(
            objects.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
            _model("b", spec={"extra": 1}), field_validation="Strict",
        )  # fmt: skip
        assert (code, body["reason"]) == (400, "BadRequest")
        assert ".spec.extra" in body["message"]
        # The CRD's list-map keys hold for apply as for the built-in resource.
        _apply_status(objects, "a", "node-a", {"nodes": [{"name": "node-a", "bytesDone": 1}]})
        _apply_status(objects, "a", "node-b", {"nodes": [{"name": "node-b", "bytesDone": 2}]})
        assert [e["name"] for e in _get(objects, "a")["status"]["nodes"]] == ["node-a", "node-b"]


def test_a_crd_refuses_invalid_objects_naming_the_field() -> None:
    pytest.importorskip("jsonschema")
    with KubeApiServer(NS, crds=[CRD]) as api:
        objects = client.CustomObjectsApi(api_client(api.url))
        missing = _model("a")
        del missing["spec"]["source"]
        code, body = _refused(_create, objects, missing)
        assert (code, body["reason"]) == (422, "Invalid")
        assert body["details"]["causes"] == [
            {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.source"}
        ]
        assert (
            body["message"] == 'CachedModel.cachefs.io "a" is invalid: spec.source: Required value'
        )

        code, body = _refused(_create, objects, _model("a", spec={"updatePolicy": "Sometimes"}))
        assert code == 422
        (cause,) = body["details"]["causes"]
        assert (cause["field"], cause["reason"]) == ("spec.updatePolicy", "FieldValueNotSupported")

        _create(objects, _model("a"))
        code, body = _refused(
            _apply_status, objects, "a", "node-a", {"nodes": [{"name": "n", "bytesDone": "x"}]}
        )
        assert code == 422
        assert body["details"]["causes"][0]["field"] == "status.nodes[0].bytesDone"
        assert api.get(NS, "a").get("status") is None  # nothing written
