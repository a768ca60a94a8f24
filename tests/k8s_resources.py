"""What the Kubernetes API stand-in knows of resources, without HTTP or storage.

Each served resource and what the API does differently for it (``Resource``, from a
CRD's served versions and schema markers too), the Status errors it answers with,
label and field selectors, a CRD schema's pruning, defaulting and validation, the
field sets of server-side apply (owned leaves in fieldsV1 notation, merged by list
type) and JSON merge and JSON patches. ``k8s_store`` keeps the objects; ``k8s_api``
serves them and says which documented semantics are followed.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# A field path in fieldsV1 notation: ("f:status", "f:nodes", 'k:{"name":"a"}', "f:phase").
FieldPath = tuple[str, ...]
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
ROOT_FIELDS = ("apiVersion", "kind", "metadata")
OWNED_METADATA = ("labels", "annotations", "finalizers", "ownerReferences")


@dataclass(frozen=True, eq=False)
class Resource:
    """One served resource: its names, and what the API does differently for it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # the status subresource: only it writes status
    generation: bool = True  # metadata.generation is kept (not for Leases)
    unconditional_update: bool = True  # PUT without metadata.resourceVersion (not for CRs)
    custom: bool = False  # a CR: apiVersion and kind required, no strategic merge patch
    schema: Mapping[str, Any] | None = None  # the CRD's openAPIV3Schema
    list_maps: Mapping[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)
    sets: frozenset[tuple[str, ...]] = frozenset({("metadata", "finalizers")})
    atomic: frozenset[tuple[str, ...]] = frozenset()  # maps replaced whole by apply

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """``cachedmodels.cachefs.io``: how errors name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def keys_at(self, spath: tuple[str, ...]) -> tuple[str, ...] | None:
        """The list-map keys of the list at ``spath`` (list items are ``*``), if it is one."""
        return _lookup(self.list_maps, spath)

    def is_set(self, spath: tuple[str, ...]) -> bool:
        return _lookup(dict.fromkeys(self.sets, True), spath) is not None

    def is_atomic(self, spath: tuple[str, ...]) -> bool:
        return _lookup(dict.fromkeys(self.atomic, True), spath) is not None


def _lookup(table: Mapping[tuple[str, ...], Any], spath: tuple[str, ...]) -> Any:
    for pattern, value in table.items():
        if len(pattern) == len(spath) and all(
            p in ("*", s) for p, s in zip(pattern, spath, strict=True)
        ):
            return value
    return None


CACHED_MODELS = Resource(
    "cachefs.io",
    "v1alpha1",
    "cachedmodels",
    "CachedModel",
    status=True,
    unconditional_update=False,
    custom=True,
    list_maps={("status", "nodes"): ("name",), ("status", "conditions"): ("type",)},
    atomic=frozenset({("spec", "nodeSelector")}),
)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", generation=False)
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")


def crd_resources(crd: Mapping[str, Any]) -> list[Resource]:
    """The served versions of a CustomResourceDefinition, with their schema's markers."""
    spec = crd["spec"]
    names = spec["names"]
    out = []
    for version in spec.get("versions") or ():
        if not version.get("served", True):
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        list_maps: dict[tuple[str, ...], tuple[str, ...]] = {}
        sets = {("metadata", "finalizers")}
        atomic: set[tuple[str, ...]] = set()
        _markers(schema or {}, (), list_maps, sets, atomic)
        out.append(
            Resource(
                spec["group"],
                version["name"],
                names["plural"],
                names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status="status" in (version.get("subresources") or {}),
                unconditional_update=False,
                custom=True,
                schema=schema,
                list_maps=list_maps,
                sets=frozenset(sets),
                atomic=frozenset(atomic),
            )
        )
    return out


def _markers(schema: Mapping[str, Any], spath: tuple[str, ...], list_maps, sets, atomic) -> None:
    """Collect x-kubernetes-list-type / list-map-keys / map-type markers by schema path."""
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        list_maps[spath] = tuple(schema.get("x-kubernetes-list-map-keys") or ())
    elif list_type == "set":
        sets.add(spath)
    if schema.get("x-kubernetes-map-type") == "atomic":
        atomic.add(spath)
    for key, sub in (schema.get("properties") or {}).items():
        _markers(sub, (*spath, key), list_maps, sets, atomic)
    for sub in (schema.get("items"), schema.get("additionalProperties")):
        if isinstance(sub, Mapping):
            _markers(sub, (*spath, "*"), list_maps, sets, atomic)


# -- errors -----------------------------------------------------------------------------


class ApiError(Exception):
    """A refused request: ``status()`` is the Status object the API answers with."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def not_found(res: Resource, name: str) -> ApiError:
    details = {"name": name, "group": res.group, "kind": res.plural}
    return ApiError(404, "NotFound", f'{res.group_resource} "{name}" not found', details)


def conflict(res: Resource, name: str, why: str) -> ApiError:
    details = {"name": name, "group": res.group, "kind": res.plural}
    text = f'Operation cannot be fulfilled on {res.group_resource} "{name}": {why}'
    return ApiError(409, "Conflict", text, details)


def invalid(res: Resource, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 Invalid; ``causes``: (field, reason, message), as field.ErrorList reports them."""
    parts = [f"{where}: {message}" for where, _, message in causes]
    text = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    qualified = f"{res.kind}.{res.group}" if res.group else res.kind
    details = {
        "name": name,
        "group": res.group,
        "kind": res.kind,
        "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes],
    }
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {text}', details)


# -- selectors --------------------------------------------------------------------------

_LABEL_TERM = re.compile(
    r"\s*(?:!\s*(?P<absent>[^\s!=,()]+)"
    r"|(?P<key>[^\s!=,()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[^\s!=,()]*)"
    r"|\s(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?)\s*(?:,|$)"
)
_FIELD_TERM = re.compile(r"\s*([^\s!=]+)\s*(==|=|!=)\s*([^,]*?)\s*")
_SELECTABLE = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True)
class Selector:
    """A labelSelector (equality- and set-based) and a fieldSelector (metadata.name/namespace)."""

    labels: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, labels: str = "", fields: str = "") -> Selector:
        terms = []
        text, pos = labels.strip(), 0
        while pos < len(text):
            m = _LABEL_TERM.match(text, pos)
            if not m or m.end() == pos:
                raise bad_request(f"unable to parse requirement: {text[pos:]!r}")
            pos = m.end()
            if m["absent"]:
                terms.append((m["absent"], "!", ()))
            elif m["op"]:
                terms.append((m["key"], "!=" if m["op"] == "!=" else "=", (m["value"],)))
            elif m["set"]:
                values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
                terms.append((m["key"], m["set"], values))
            else:
                terms.append((m["key"], "exists", ()))
        checks = []
        for term in filter(None, (t.strip() for t in fields.split(","))):
            m = _FIELD_TERM.fullmatch(term)
            if not m:
                raise bad_request(f"invalid selector: {term!r}")
            if m[1] not in _SELECTABLE:
                raise bad_request(f'field label not supported: "{m[1]}"')
            checks.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
        return cls(tuple(terms), tuple(checks))

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        for key, op, values in self.labels:
            have = labels.get(key)
            ok = {
                "exists": have is not None,
                "!": have is None,
                "=": have == values[0] if values else False,
                "!=": have != values[0] if values else True,
                "in": have in values,
                "notin": have not in values,
            }[op]
            if not ok:
                return False
        for name, op, value in self.fields:
            have = meta.get(name.split(".", 1)[1]) or ""
            if (have == value) != (op == "="):
                return False
        return True


# -- schemas: pruning, defaulting, validation -------------------------------------------


def prune(obj: dict[str, Any], schema: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``obj`` without the fields the schema does not declare (and nulls it does not allow),
    with its defaults set; and the dropped fields' paths, for a warning or a refusal."""
    dropped: list[str] = []
    rest = _prune({k: v for k, v in obj.items() if k not in ROOT_FIELDS}, schema, "", dropped)
    return {**{k: obj[k] for k in ROOT_FIELDS if k in obj}, **rest}, dropped


def _prune(value: Any, schema: Any, path: str, dropped: list[str]) -> Any:
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep_all = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or extra is True
        out = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            sub = props.get(key) if key in props else extra
            if key not in props and not isinstance(extra, Mapping) and not keep_all:
                dropped.append(where)
                continue
            if item is None and isinstance(sub, Mapping) and not sub.get("nullable"):
                continue
            out[key] = _prune(item, sub, where, dropped)
        for key, sub in props.items():
            if key not in out and (path or key not in ROOT_FIELDS) and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_prune(v, schema["items"], f"{path}[{i}]", dropped) for i, v in enumerate(value)]
    return value


def _jsonschema() -> Any:
    try:
        return importlib.import_module("jsonschema")
    except ImportError:
        return None


def validate(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(field, reason, message) of each way ``obj`` breaks the schema; none without jsonschema."""
    jsonschema = _jsonschema()
    if jsonschema is None:
        return []
    instance = {k: v for k, v in obj.items() if k != "metadata"}
    validator = jsonschema.Draft4Validator(_as_json_schema(schema))
    causes: list[tuple[str, str, str]] = []
    for error in validator.iter_errors(instance):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        where = where.lstrip(".")
        found = error.instance
        if error.validator == "required" and isinstance(found, dict):
            missing = [p for p in error.validator_value if p not in found]
            causes += [
                (f"{where}.{p}".lstrip("."), "FieldValueRequired", "Required value")
                for p in missing
            ]
        elif error.validator == "enum":
            allowed = ", ".join(json.dumps(v) for v in error.validator_value)
            message = f"Unsupported value: {json.dumps(found)}: supported values: {allowed}"
            causes.append((where, "FieldValueNotSupported", message))
        elif error.validator == "type":
            message = f"Invalid value: {json.dumps(found)}: must be of type {error.validator_value}"
            causes.append((where, "FieldValueTypeInvalid", message))
        else:
            shown = json.dumps(found)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            causes.append((where, "FieldValueInvalid", f"Invalid value: {shown}: {error.message}"))
    return sorted(set(causes))


def _as_json_schema(schema: Any) -> Any:
    """OpenAPI v3 as JSON Schema: ``nullable`` allows null; int-or-string has no one type."""
    if isinstance(schema, list):
        return [_as_json_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _as_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {k: _as_json_schema(v) for k, v in schema["properties"].items()}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    return out


# -- field sets and server-side apply ---------------------------------------------------


def owned_part(obj: Mapping[str, Any], res: Resource, scope: str) -> dict[str, Any]:
    """The fields of ``obj`` that managers own: ``main`` (spec and the like, labels,
    annotations, finalizers), ``status`` (the status subresource) or ``all``."""
    out: dict[str, Any] = {}
    if scope in ("main", "all"):
        for key, value in obj.items():
            if key not in ROOT_FIELDS and not (res.status and key == "status"):
                out[key] = value
        meta = obj.get("metadata") or {}
        owned = {k: meta[k] for k in OWNED_METADATA if meta.get(k) not in (None, [], {})}
        if owned:
            out["metadata"] = owned
    if scope in ("status", "all") and res.status and "status" in obj:
        out["status"] = obj["status"]
    return out


def _item_key(item: Any, keys: tuple[str, ...]) -> str:
    return "k:" + json.dumps({k: item[k] for k in keys}, separators=(",", ":"), sort_keys=True)


def leaves(value: Any, res: Resource, path: FieldPath = (), spath: tuple[str, ...] = ()):
    """Every owned field of ``value``: path -> value. Empty maps and lists are their own
    leaf; list-map items are keyed by their keys, set items by their value."""
    out: dict[FieldPath, Any] = {}
    if isinstance(value, dict) and value and not res.is_atomic(spath):
        for key, item in value.items():
            out.update(leaves(item, res, (*path, f"f:{key}"), (*spath, key)))
        return out
    if isinstance(value, list) and value:
        keys = res.keys_at(spath)
        if keys is not None:
            for item in value:
                if not isinstance(item, dict) or any(k not in item for k in keys):
                    raise bad_request(f"{describe(path)}: list-map items need the keys {keys}")
                ident = _item_key(item, keys)
                if any(p[len(path)] == ident for p in out):
                    raise bad_request(f"{describe(path)}: duplicate entries for key {ident[2:]}")
                out.update(leaves(item, res, (*path, ident), (*spath, "*")))
            return out
        if res.is_set(spath):
            return {(*path, "v:" + json.dumps(item)): item for item in value}
    out[path] = value
    return out


def describe(path: FieldPath) -> str:
    """``.status.nodes[name="a"].phase``: a field path as conflicts name it."""
    text = ""
    for part in path:
        kind, rest = part[0], part[2:]
        if kind == "f":
            text += f".{rest}"
        elif kind == "k":
            text += (
                "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(rest).items()) + "]"
            )
        else:
            text += f"[={rest}]"
    return text


def merge(cur: Any, applied: Any, res: Resource, spath: tuple[str, ...] = ()) -> Any:
    """``applied`` merged into ``cur``: maps by key, list-maps by item key, sets by value;
    scalars, atomic lists and atomic maps replaced."""
    if isinstance(cur, dict) and isinstance(applied, dict) and not res.is_atomic(spath):
        out = dict(cur)
        for key, value in applied.items():
            sub = (*spath, key)
            out[key] = merge(cur[key], value, res, sub) if key in cur else copy.deepcopy(value)
        return out
    if isinstance(cur, list) and isinstance(applied, list):
        keys = res.keys_at(spath)
        if keys is not None:
            out_list = list(cur)
            where = {_item_key(item, keys): i for i, item in enumerate(out_list)}
            for item in applied:
                i = where.get(_item_key(item, keys))
                if i is None:
                    out_list.append(copy.deepcopy(item))
                else:
                    out_list[i] = merge(out_list[i], item, res, (*spath, "*"))
            return out_list
        if res.is_set(spath):
            return list(cur) + [copy.deepcopy(v) for v in applied if v not in cur]
    return copy.deepcopy(applied)


def remove(obj: dict[str, Any], path: FieldPath) -> None:
    """Delete the field at ``path``; maps and list items it leaves empty go too. Remove
    an item's other fields first (``removal_order``): its keys stay while it has any."""
    trail: list[tuple[Any, Any]] = []  # (container, index or key)
    node: Any = obj
    for part in path:
        kind, rest = part[0], part[2:]
        if kind == "f" and isinstance(node, dict) and rest in node:
            trail.append((node, rest))
            node = node[rest]
        elif kind in "kv" and isinstance(node, list):
            want = json.loads(rest)
            for i, item in enumerate(node):
                if (kind == "v" and item == want) or (
                    kind == "k"
                    and isinstance(item, dict)
                    and all(item.get(k) == v for k, v in want.items())
                ):
                    trail.append((node, i))
                    node = item
                    break
            else:
                return
        else:
            return
    if len(path) > 1 and path[-2].startswith("k:"):
        keys = json.loads(path[-2][2:])
        if path[-1][2:] in keys and set(trail[-1][0]) - set(keys):
            return  # an item's key stays while the item has other fields
    while trail:  # top-level fields (spec, status) stay, even empty
        container, at = trail.pop()
        del container[at]
        if container or len(trail) <= 1:
            return


def removal_order(path: FieldPath) -> tuple[bool, int]:
    """Deepest first, list-map item keys last."""
    key_field = len(path) > 1 and path[-2].startswith("k:")
    return (key_field and path[-1][2:] in json.loads(path[-2][2:]), -len(path))


def fields_v1(paths: set[FieldPath]) -> dict[str, Any]:
    """The managedFields ``fieldsV1`` tree of a set of owned fields."""
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for part in path:
            node = node.setdefault(part, {})
            if part[0] in "kv":
                node.setdefault(".", {})
    return root


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merged, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy and test."""
    if not isinstance(ops, list):
        raise bad_request("a JSON patch is a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op") if isinstance(op, dict) else None
        try:
            path = _pointer(op.get("path", ""))
            if kind == "test":
                if _at(doc, path) != op.get("value"):
                    raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
            elif kind == "remove":
                _take(doc, path)
            elif kind == "add":
                _put(doc, path, copy.deepcopy(op["value"]), insert=True)
            elif kind == "replace":
                _at(doc, path)
                _put(doc, path, copy.deepcopy(op["value"]), insert=False)
            elif kind in ("move", "copy"):
                source = _pointer(op["from"])
                value = _take(doc, source) if kind == "move" else copy.deepcopy(_at(doc, source))
                _put(doc, path, value, insert=True)
            else:
                raise bad_request(f"unknown JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from exc
    return doc


def _pointer(text: str) -> list[str]:
    if text and not text.startswith("/"):
        raise ValueError(f"bad JSON pointer {text!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in text.split("/")[1:]]


def _at(doc: Any, path: list[str]) -> Any:
    for part in path:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _take(doc: Any, path: list[str]) -> Any:
    parent = _at(doc, path[:-1])
    return parent.pop(int(path[-1]) if isinstance(parent, list) else path[-1])


def _put(doc: Any, path: list[str], value: Any, insert: bool) -> None:
    parent = _at(doc, path[:-1])
    if isinstance(parent, list):
        i = len(parent) if path[-1] == "-" else int(path[-1])
        if insert:
            parent.insert(i, value)
        else:
            parent[i] = value
    else:
        parent[path[-1]] = value
