"""The object store behind the Kubernetes API stand-in: every object of every resource,
the write path every verb shares, and the history of changes that watches replay.

One global resourceVersion counter orders every write of every resource, as etcd's
revision does; each write that changes an object is an event (ADDED, MODIFIED,
DELETED), and a write that changes nothing is none. ``k8s_api``'s docstring says which
documented semantics are followed and where this is simpler.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import random
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k8s_resources import (
    APPLY,
    JSON_PATCH,
    MERGE,
    OWNED_METADATA,
    ROOT_FIELDS,
    STRATEGIC,
    ApiError,
    FieldPath,
    Resource,
    Selector,
    bad_request,
    conflict,
    describe,
    fields_v1,
    invalid,
    json_patch,
    leaves,
    merge,
    merge_patch,
    not_found,
    owned_part,
    prune,
    removal_order,
    remove,
    validate,
)

_SYSTEM_METADATA = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MISSING = object()
_MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Manager:
    """One managedFields entry: who owns which fields, through which operation."""

    manager: str
    operation: str  # Apply or Update
    subresource: str  # "" or "status"
    fields: set[FieldPath]
    time: str = field(default_factory=now)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.manager, self.operation, self.subresource)


@dataclass
class Record:
    obj: dict[str, Any]
    managers: list[Manager]


@dataclass(frozen=True)
class Event:
    """A change: ``old`` is the state before (None for ADDED), for selector transitions."""

    version: int
    type: str  # ADDED, MODIFIED or DELETED
    resource: Resource
    old: dict[str, Any] | None
    obj: dict[str, Any]


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


class Store:
    """Every object of every resource, and the history of their changes."""

    def __init__(self, resources: list[Resource], first_version: int = 100) -> None:
        self.cond = threading.Condition()
        self.version = first_version
        self.compacted = 0  # watches from a version <= this are too old (410)
        self.history: list[Event] = []  # what watches replay; expire() forgets it
        self.log: list[Event] = []  # every event, for tests
        self._resources: dict[tuple[str, str, str], Resource] = {}
        self._records: dict[tuple[str, str, str, str], Record] = {}
        for res in resources:
            self.register(res)

    def register(self, res: Resource) -> None:
        self._resources[(res.group, res.version, res.plural)] = res

    def resource(self, group: str, version: str, plural: str) -> Resource | None:
        return self._resources.get((group, version, plural))

    def resource_for(self, api_version: str, kind: str) -> Resource:
        for res in self._resources.values():
            if res.api_version == api_version and res.kind == kind:
                return res
        raise KeyError(f"no resource of {api_version} {kind}")

    def by_plural(self, plural: str) -> Resource:
        for res in self._resources.values():
            if res.plural == plural:
                return res
        raise KeyError(f"no resource {plural}")

    # -- reads ---------------------------------------------------------------------------

    def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any]:
        with self.cond:
            return self._render(res, self._record(res, namespace, name))

    def list(self, res: Resource, namespace: str | None, selector: Selector) -> dict[str, Any]:
        with self.cond:
            items = [self._render(res, rec) for rec in self.records(res, namespace)]
            return {
                "apiVersion": res.api_version,
                "kind": f"{res.kind}List",
                "metadata": {"resourceVersion": str(self.version)},
                "items": [item for item in items if selector.matches(item)],
            }

    def records(self, res: Resource, namespace: str | None) -> list[Record]:
        """The objects of ``res`` (in ``namespace``, or all), in key order as etcd lists."""
        found = [
            (key, rec)
            for key, rec in self._records.items()
            if key[:2] == (res.group, res.plural) and namespace in (None, key[2])
        ]
        return [rec for _, rec in sorted(found, key=lambda kv: kv[0])]

    def pending(self, res: Resource, namespace: str | None, since: int) -> list[Event]:
        return [
            e
            for e in self.history
            if e.version > since
            and (e.resource.group, e.resource.plural) == (res.group, res.plural)
            and namespace in (None, _meta(e.obj).get("namespace"))
        ]

    def render(self, res: Resource, rec: Record) -> dict[str, Any]:
        return self._render(res, rec)

    # -- writes --------------------------------------------------------------------------

    def create(
        self, res: Resource, namespace: str, body: Any, manager: str, validation: str = "Warn"
    ) -> tuple[dict[str, Any], list[str]]:
        """POST: a new object (201); 409 AlreadyExists if its name is taken."""
        with self.cond:
            obj = self._new_object(res, namespace, body)
            name = obj["metadata"]["name"]
            if self._key(res, namespace, name) in self._records:
                details = {"name": name, "group": res.group, "kind": res.plural}
                text = f'{res.group_resource} "{name}" already exists'
                raise ApiError(409, "AlreadyExists", text, details)
            obj, warnings = self._admit(res, obj, None, validation)
            fields = set(leaves(owned_part(obj, res, "all"), res))
            managers = [Manager(manager, "Update", "", fields)] if fields else []
            return self._commit(res, None, obj, managers), warnings

    def update(
        self,
        res: Resource,
        namespace: str,
        name: str,
        body: Any,
        manager: str,
        subresource: str = "",
        validation: str = "Warn",
        require_version: bool = True,
    ) -> tuple[dict[str, Any], list[str]]:
        """PUT (and the result of a merge or JSON patch): 409 on a stale resourceVersion.
        The main resource keeps the stored status; /status changes only status."""
        with self.cond:
            rec = self._record(res, namespace, name)
            self._check_identity(res, namespace, name, body)
            version = str(_meta(body).get("resourceVersion") or "")
            if not version and require_version and not res.unconditional_update:
                message = "Invalid value: 0x0: must be specified for an update"
                raise invalid(
                    res, name, [("metadata.resourceVersion", "FieldValueInvalid", message)]
                )
            if version and version != rec.obj["metadata"]["resourceVersion"]:
                raise conflict(res, name, _MODIFIED)
            new = self._replaced(res, rec.obj, body, subresource)
            new, warnings = self._admit(res, new, rec.obj, validation)
            managers = _track_update(res, rec, new, manager, subresource)
            return self._commit(res, rec, new, managers), warnings

    def patch(
        self,
        res: Resource,
        namespace: str,
        name: str,
        content_type: str,
        patch: Any,
        manager: str,
        subresource: str = "",
        force: bool = False,
        validation: str = "Warn",
    ) -> tuple[dict[str, Any], list[str], bool]:
        """PATCH: apply (which creates), merge or JSON patch; the result, and whether created."""
        if content_type == APPLY:
            return self.apply(res, namespace, name, patch, manager, subresource, force, validation)
        if force:
            raise bad_request("force is only allowed for apply patches")
        with self.cond:
            cur = self._render(res, self._record(res, namespace, name))
            if content_type == MERGE or (content_type == STRATEGIC and not res.custom):
                if not isinstance(patch, dict):
                    raise bad_request("a merge patch is a JSON object")
                patched = merge_patch(cur, patch)
            elif content_type == JSON_PATCH:
                patched = json_patch(cur, patch)
            else:
                message = f"the patch type {content_type!r} is not supported"
                raise ApiError(415, "UnsupportedMediaType", message)
            obj, warnings = self.update(
                res,
                namespace,
                name,
                patched,
                manager,
                subresource,
                validation,
                require_version=False,
            )
            return obj, warnings, False

    def apply(
        self,
        res: Resource,
        namespace: str,
        name: str,
        body: Any,
        manager: str,
        subresource: str = "",
        force: bool = False,
        validation: str = "Warn",
    ) -> tuple[dict[str, Any], list[str], bool]:
        """Server-side apply: ``manager`` owns exactly the fields of ``body``; fields it
        owned before and left out are removed (unless another manager owns them); a
        field another manager owns with another value is a conflict unless ``force``."""
        if not manager:
            raise bad_request("PATCH /apply requires fieldManager")
        if not isinstance(body, dict) or not body.get("apiVersion") or not body.get("kind"):
            raise bad_request("an apply configuration needs apiVersion and kind")
        scope = "status" if subresource else "main"
        with self.cond:
            self._check_identity(res, namespace, name, body)
            applied = owned_part(body, res, scope)
            applied_fields = leaves(applied, res)
            rec = self._records.get(self._key(res, namespace, name))
            if rec is None:
                if subresource:
                    raise not_found(res, name)
                new_body = {**applied, **{k: body[k] for k in ROOT_FIELDS if k in body}}
                obj = self._new_object(res, namespace, new_body)
                obj, warnings = self._admit(res, obj, None, validation)
                managers = [Manager(manager, "Apply", "", set(applied_fields))]
                return self._commit(res, None, obj, managers), warnings, True
            version = str(_meta(body).get("resourceVersion") or "")
            if version and version != rec.obj["metadata"]["resourceVersion"]:
                raise conflict(res, name, _MODIFIED)
            current = leaves(owned_part(rec.obj, res, "all"), res)
            me = (manager, "Apply", subresource)
            managers = [copy.deepcopy(m) for m in rec.managers]
            conflicts = [
                (path, m)
                for path, value in applied_fields.items()
                if value not in ({}, [])  # an empty map or list only marks its owner
                for m in managers
                if m.key != me and path in m.fields and current.get(path, _MISSING) != value
            ]
            if conflicts and not force:
                raise _apply_conflict(res, name, conflicts)
            for path, m in conflicts:
                m.fields.discard(path)
            mine = next((m for m in managers if m.key == me), None)
            before = set(mine.fields) if mine else set()
            new = merge(copy.deepcopy(rec.obj), applied, res)
            others = [m for m in managers if m.key != me]
            for path in sorted(before - set(applied_fields), key=removal_order):
                if not any(f[: len(path)] == path for m in others for f in m.fields):
                    remove(new, path)
            if mine is None:
                mine = Manager(manager, "Apply", subresource, set())
                managers.append(mine)
            if mine.fields != set(applied_fields):
                mine.fields, mine.time = set(applied_fields), now()
            new, warnings = self._admit(res, new, rec.obj, validation)
            managers = [m for m in managers if m.fields]
            return self._commit(res, rec, new, managers), warnings, False

    def delete(
        self, res: Resource, namespace: str, name: str, options: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], bool]:
        """DELETE: with finalizers, only marks the object (deletionTimestamp, MODIFIED) and
        answers with it; without, removes it (DELETED) and answers a Status. Whether gone."""
        with self.cond:
            rec = self._record(res, namespace, name)
            meta = rec.obj["metadata"]
            pre = (options or {}).get("preconditions") or {}
            for what, key in (("UID", "uid"), ("ResourceVersion", "resourceVersion")):
                if pre.get(key) and pre[key] != meta.get(key):
                    why = f"Precondition failed: {what} in precondition: {pre[key]}, "
                    raise conflict(res, name, why + f"{what} in object meta: {meta.get(key)}")
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return self._render(res, rec), False
                new = copy.deepcopy(rec.obj)
                new["metadata"]["deletionTimestamp"] = now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                return self._commit(res, rec, new, rec.managers, bump=True), False
            self._remove(res, rec)
            details = {"name": name, "group": res.group, "kind": res.plural, "uid": meta.get("uid")}
            status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
            return {**status, "details": details}, True

    # -- what a test does directly, as a write to etcd would ------------------------------

    def put(self, obj: dict[str, Any], namespace: str, quiet: bool = False) -> dict[str, Any]:
        """Create or replace an object as given, without the API's checks."""
        with self.cond:
            res = self.resource_for(obj["apiVersion"], obj["kind"])
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if res.namespaced:
                meta["namespace"] = meta.get("namespace") or namespace
            else:
                meta.pop("namespace", None)
            rec = self._records.get(self._key(res, meta.get("namespace", ""), meta["name"]))
            old = rec.obj["metadata"] if rec else {}
            for key, value in (("uid", str(uuid.uuid4())), ("creationTimestamp", now())):
                meta.setdefault(key, old.get(key) or value)
            if res.generation:
                meta.setdefault("generation", old.get("generation", 1))
            return self._commit(res, rec, obj, rec.managers if rec else [], quiet=quiet, write=True)

    def remove_direct(self, res: Resource, namespace: str, name: str, quiet: bool = False) -> None:
        """Remove an object at once, finalizers or not."""
        with self.cond:
            self._remove(res, self._record(res, namespace, name), quiet=quiet)

    def expire(self) -> None:
        """Forget all history: watches from before now are too old (410)."""
        with self.cond:
            self.version += 1
            self.compacted = self.version - 1
            self.history.clear()
            self.cond.notify_all()

    # -- the write path ----------------------------------------------------------------

    def _key(self, res: Resource, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (res.group, res.plural, namespace or "" if res.namespaced else "", name)

    def _record(self, res: Resource, namespace: str | None, name: str) -> Record:
        rec = self._records.get(self._key(res, namespace, name))
        if rec is None:
            raise not_found(res, name)
        return rec

    def _render(self, res: Resource, rec: Record) -> dict[str, Any]:
        """The object as the API shows it: this version's apiVersion, managedFields."""
        obj = copy.deepcopy(rec.obj)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if rec.managers:
            entries = []
            for m in rec.managers:
                entry = {
                    "manager": m.manager,
                    "operation": m.operation,
                    "apiVersion": res.api_version,
                    "time": m.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(m.fields),
                }
                if m.subresource:
                    entry["subresource"] = m.subresource
                entries.append(entry)
            obj["metadata"]["managedFields"] = entries
        return obj

    def _check_identity(self, res: Resource, namespace: str, name: str, body: Any) -> None:
        if not isinstance(body, dict):
            raise bad_request("the body is not an object")
        meta = _meta(body)
        if meta.get("name") and meta["name"] != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL"
                f" ({name})"
            )
        self._check_namespace(res, namespace, meta)
        self._check_kind(res, body)

    def _check_namespace(self, res: Resource, namespace: str, meta: Mapping[str, Any]) -> None:
        if res.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on"
                " the request"
            )

    def _check_kind(self, res: Resource, body: Mapping[str, Any]) -> None:
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if res.custom and (not api_version or not kind):
            raise bad_request(f"Object 'Kind' is missing in {json.dumps(body)[:200]}")
        if (api_version and api_version != res.api_version) or (kind and kind != res.kind):
            raise bad_request(f"{api_version} {kind} is not {res.api_version} {res.kind}")

    def _new_object(self, res: Resource, namespace: str, body: Any) -> dict[str, Any]:
        """A new object's metadata as the API sets it; status dropped where it is a subresource."""
        if not isinstance(body, dict):
            raise bad_request("the body is not an object")
        self._check_kind(res, body)
        body_meta = _meta(body)
        self._check_namespace(res, namespace, body_meta)
        name = body_meta.get("name") or ""
        if not name and body_meta.get("generateName"):
            suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            name = body_meta["generateName"] + suffix
        if not name:
            message = "Required value: name or generateName is required"
            raise invalid(res, "", [("metadata.name", "FieldValueRequired", message)])
        if len(name) > 253 or not _NAME.fullmatch(name):
            message = f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of'
            message += " lower case alphanumeric characters, '-' or '.'"
            raise invalid(res, name, [("metadata.name", "FieldValueInvalid", message)])
        obj = {k: copy.deepcopy(v) for k, v in body.items() if k not in ROOT_FIELDS}
        if res.status:
            obj.pop("status", None)
        meta = _owned_metadata(body_meta)
        meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=now())
        if res.namespaced:
            meta["namespace"] = namespace
        if res.generation:
            meta["generation"] = 1
        return {"apiVersion": res.api_version, "kind": res.kind, "metadata": meta, **obj}

    def _replaced(self, res: Resource, cur: dict[str, Any], body: dict[str, Any], subresource: str):
        """What a PUT of ``body`` leaves: the main resource keeps status, /status the rest."""
        if subresource:
            new = copy.deepcopy(cur)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
            return new
        new = {k: copy.deepcopy(v) for k, v in body.items() if k not in ROOT_FIELDS}
        if res.status:
            new.pop("status", None)
            if "status" in cur:
                new["status"] = copy.deepcopy(cur["status"])
        body_meta = _meta(body)
        meta = {k: cur["metadata"][k] for k in _SYSTEM_METADATA if k in cur["metadata"]}
        meta.update(_owned_metadata(body_meta))
        return {"apiVersion": cur["apiVersion"], "kind": cur["kind"], "metadata": meta, **new}

    def _admit(
        self, res: Resource, obj: dict[str, Any], old: dict[str, Any] | None, validation: str
    ):
        """The schema's pruning, defaults and validation; no new finalizers while deleting."""
        warnings: list[str] = []
        name = obj["metadata"]["name"]
        if res.schema is not None:
            obj, dropped = prune(obj, res.schema)
            if dropped and validation == "Strict":
                raise bad_request("; ".join(f".{d}: field not declared in schema" for d in dropped))
            if validation != "Ignore":
                warnings += [f'unknown field "{d}"' for d in dropped]
            causes = validate(obj, res.schema)
            if causes:
                raise invalid(res, name, causes)
        if old is not None and _meta(old).get("deletionTimestamp"):
            had = set(_meta(old).get("finalizers") or ())
            extra = sorted(set(_meta(obj).get("finalizers") or ()) - had)
            if extra:
                listed = ", ".join(json.dumps(f) for f in extra)
                message = (
                    "Forbidden: no new finalizers can be added if the object is being deleted,"
                )
                message += f" found new finalizers []string{{{listed}}}"
                raise invalid(res, name, [("metadata.finalizers", "FieldValueForbidden", message)])
        return obj, warnings

    def _commit(
        self,
        res: Resource,
        rec: Record | None,
        obj: dict[str, Any],
        managers: list[Manager],
        bump: bool = False,
        quiet: bool = False,
        write: bool = False,
    ) -> dict[str, Any]:
        """Store ``obj`` at the next resourceVersion and record the event (none if
        ``quiet``). A write that changes nothing is no write (no new version, no event)
        unless ``write``; a deleted object whose last finalizer went is removed."""
        if rec is not None and res.generation:
            generation = int(rec.obj["metadata"].get("generation") or 1)
            if bump or _spec_part(res, obj) != _spec_part(res, rec.obj):
                generation += 1
            obj["metadata"]["generation"] = generation
        managers = _owning(res, obj, managers)
        if rec is not None:
            obj["metadata"]["resourceVersion"] = rec.obj["metadata"].get("resourceVersion")
            fields = [(m.key, m.fields) for m in managers]
            same = obj == rec.obj and fields == [(m.key, m.fields) for m in rec.managers]
            if same and not write:
                return self._render(res, rec)
        meta = obj["metadata"]
        if rec is not None and meta.get("deletionTimestamp") and not meta.get("finalizers"):
            rec.obj, rec.managers = obj, managers
            self._remove(res, rec, quiet=quiet)
            return self._render(res, rec)
        self.version += 1
        meta["resourceVersion"] = str(self.version)
        old = self._render(res, rec) if rec is not None else None
        kind = "ADDED" if rec is None else "MODIFIED"
        if rec is None:
            rec = Record(obj, managers)
            self._records[self._key(res, meta.get("namespace"), meta["name"])] = rec
        else:
            rec.obj, rec.managers = obj, managers
        rendered = self._render(res, rec)
        if not quiet:
            self._event(Event(self.version, kind, res, old, copy.deepcopy(rendered)))
        self.cond.notify_all()
        return rendered

    def _remove(self, res: Resource, rec: Record, quiet: bool = False) -> None:
        old = self._render(res, rec)
        meta = rec.obj["metadata"]
        del self._records[self._key(res, meta.get("namespace"), meta["name"])]
        self.version += 1
        meta["resourceVersion"] = str(self.version)
        if not quiet:
            self._event(Event(self.version, "DELETED", res, old, self._render(res, rec)))
        self.cond.notify_all()

    def _event(self, event: Event) -> None:
        self.history.append(event)
        self.log.append(event)


def _owned_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Labels, annotations, finalizers and ownerReferences; empty ones are left out, as
    the API omits them."""
    return {k: copy.deepcopy(meta[k]) for k in OWNED_METADATA if meta.get(k) not in (None, [], {})}


def _spec_part(res: Resource, obj: Mapping[str, Any]) -> dict[str, Any]:
    """What metadata.generation counts: all but metadata (and status, a subresource)."""
    return {
        k: v for k, v in obj.items() if k not in ROOT_FIELDS and not (res.status and k == "status")
    }


def _owning(res: Resource, obj: dict[str, Any], managers: list[Manager]) -> list[Manager]:
    """The managers with their fields that ``obj`` still has (pruning, removals)."""
    present = set()
    for path in leaves(owned_part(obj, res, "all"), res):
        present.update(path[:i] for i in range(1, len(path) + 1))
    kept = [dataclasses.replace(m, fields=m.fields & present) for m in managers]
    return [m for m in kept if m.fields]


def _track_update(
    res: Resource, rec: Record, new: dict[str, Any], manager: str, subresource: str
) -> list[Manager]:
    """Ownership after a non-apply write: the writer takes the fields it changed; fields it
    removed are no one's."""
    before = leaves(owned_part(rec.obj, res, "all"), res)
    after = leaves(owned_part(new, res, "all"), res)
    changed = {p for p, v in after.items() if before.get(p, _MISSING) != v}
    gone = set(before) - set(after)
    key = (manager, "Update", subresource)
    managers = [copy.deepcopy(m) for m in rec.managers]
    for m in managers:
        m.fields -= gone
        if m.key != key:
            m.fields -= changed
    if changed:
        mine = next((m for m in managers if m.key == key), None)
        if mine is None:
            managers.append(Manager(manager, "Update", subresource, set(changed)))
        elif not changed <= mine.fields:
            mine.fields |= changed
            mine.time = now()
    return [m for m in managers if m.fields]


def _apply_conflict(
    res: Resource, name: str, conflicts: list[tuple[FieldPath, Manager]]
) -> ApiError:
    causes = []
    for path, m in conflicts:
        who = f'conflict with "{m.manager}"'
        if m.operation == "Update":
            who += f" using {res.api_version}"
        causes.append({"reason": "FieldManagerConflict", "message": who, "field": describe(path)})
    listed = "; ".join(f"{c['message']}: {c['field']}" for c in causes)
    plural = "s" if len(causes) > 1 else ""
    details = {"name": name, "group": res.group, "kind": res.plural, "causes": causes}
    message = f"Apply failed with {len(causes)} conflict{plural}: {listed}"
    return ApiError(409, "Conflict", message, details)
