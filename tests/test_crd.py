"""The CachedModel CRD (charts/cachefs/crds/) and every CachedModel the project ships.

No Kubernetes API server runs here, so these tests do what it would do, by its rules:

- the CRD is a valid object of the Kubernetes 1.33 schemas (kubernetes_validate,
  strict) and its schema is *structural*, as the API server requires of a v1 CRD
  (every node typed, no ``additionalProperties`` beside ``properties``, no keywords
  it refuses, map-list keys required);
- an object is checked against the CRD's ``openAPIV3Schema`` as the API server checks
  one: types, formats (int32, int64, date-time), patterns, enums, lengths, required
  fields; unknown fields refused, as a request with ``fieldValidation=Strict``
  (kubectl's default) is; keys of map lists unique; and the CEL rules
  (``x-kubernetes-validations``), which a small evaluator below runs for the forms the
  CRD uses: a rule of another form fails the test until the evaluator learns it;
- defaults are applied the way the API server applies them before validating.

The objects: the chart's rendered CachedModels (every case of tests/test_chart.py),
examples/cachedmodel.yaml and the CachedModels docs/kubernetes.md shows, status
included; and bad objects, each of which must be refused at the field at fault.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO_ROOT
from jsonschema.exceptions import ValidationError
from test_chart import CASES, CHART, EXAMPLES, KUBE_VERSION, NAMESPACE, of_kind, one, render

from cachefs.node.labels import label_key
from cachefs.node.models.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION

CRD_NAME = f"{PLURAL}.{GROUP}"
DOCS = REPO_ROOT / "docs" / "kubernetes.md"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def crd(chart: helm_python.Chart) -> dict[str, Any]:
    (found,) = chart.crds  # Helm installs the files under crds/ before the templates
    assert found["name"] == f"crds/{CRD_NAME}.yaml"
    (obj,) = [o for o in yaml.safe_load_all(found["data"]) if o]
    return obj


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (served,) = crd["spec"]["versions"]
    return served


@pytest.fixture(scope="module")
def check(version: dict[str, Any]) -> Callable[[dict[str, Any]], list[ValidationError]]:
    """The API server's verdict on an object: the errors it would answer with."""
    return admission(version["schema"]["openAPIV3Schema"])


# -- what the API server does with a CRD's schema --------------------------------------

# Keywords a v1 CRD's schema may not use (apiextensions validation), or only as noted.
FORBIDDEN = {"$ref", "definitions", "dependencies", "additionalItems", "patternProperties"}
FORBIDDEN |= {"propertyNames", "id"}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def structural_problems(node: dict[str, Any], path: str = "") -> list[str]:
    """Why ``node`` is not a structural schema, or is refused in a CRD; [] if it is."""
    where = path or "<root>"
    problems = [f"{where}: {k} is not allowed in a CRD" for k in FORBIDDEN if k in node]
    if node.get("uniqueItems"):
        problems.append(f"{where}: uniqueItems: true is refused")
    untyped = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not any(node.get(k) for k in untyped):
        problems.append(f"{where}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties together")
    for junctor in JUNCTORS:
        for sub in node.get(junctor, []) if junctor != "not" else [node.get("not")]:
            if sub and {"type", "default", "description", "additionalProperties"} & set(sub):
                problems.append(f"{where}: {junctor} sets what only its parent may")
    if "default" in node:
        try:
            jsonschema.validate(node["default"], _plain(node))
        except ValidationError as exc:
            problems.append(f"{where}: the default does not validate: {exc.message}")
    if node.get("x-kubernetes-list-type") == "map":
        items = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            item = items.get("properties", {}).get(key)
            if item is None or item.get("type") not in ("string", "integer", "boolean"):
                problems.append(f"{where}: map key {key} is not a scalar field")
            elif key not in items.get("required", []) and "default" not in item:
                problems.append(f"{where}: map key {key} is neither required nor defaulted")
        if not node.get("x-kubernetes-list-map-keys"):
            problems.append(f"{where}: a map list without keys")
    if path == ".metadata" and set(node) - {"type"}:
        problems.append(".metadata: only name and generateName may be restricted")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}[*]")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    return problems


def _plain(node: dict[str, Any]) -> dict[str, Any]:
    """A schema node as JSON Schema, without the Kubernetes extensions."""
    return {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}


# -- CEL, for the forms the CRD uses ---------------------------------------------------

_ALL = re.compile(r"self\.all\((\w+),\s*(.*)\)", re.DOTALL)
_TERM = re.compile(r"(!?)(\w+)\.matches\('([^']*)'\)")


def cel_rule(rule: str) -> Callable[[Any], bool]:
    """``self.all(x, [!]x.matches('RE') && ...)`` as a Python predicate (CEL's matches
    is an RE2 search, as re.search is for these expressions)."""
    whole = _ALL.fullmatch(" ".join(rule.split()))
    if whole is None:
        raise AssertionError(f"teach the CEL evaluator in {__name__} this rule: {rule}")
    variable, body = whole.groups()
    terms = []
    for part in body.split("&&"):
        term = _TERM.fullmatch(part.strip())
        if term is None or term.group(2) != variable:
            raise AssertionError(f"teach the CEL evaluator in {__name__} this term: {part}")
        terms.append((term.group(1) == "!", re.compile(term.group(3))))

    def holds(value: Any) -> bool:
        return all(
            all(bool(pattern.search(item)) is not negated for negated, pattern in terms)
            for item in value  # a map's keys, a list's items
        )

    return holds


# -- the API server's checks of an object ----------------------------------------------


def _cel(validator, rules, instance, schema):  # jsonschema's keyword signature
    for rule in rules:
        if not cel_rule(rule["rule"])(instance):
            yield ValidationError(rule.get("message") or f"failed rule: {rule['rule']}")


def _list_type(validator, list_type, instance, schema):
    if list_type != "map" or not isinstance(instance, list):
        return
    keys = schema["x-kubernetes-list-map-keys"]
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield ValidationError(f"Duplicate value: {dict(zip(keys, key, strict=True))}")
        seen.add(key)


def _format(validator, fmt, instance, schema):
    if fmt in INT_RANGES and isinstance(instance, int):
        low, high = INT_RANGES[fmt]
        if not low <= instance <= high:
            yield ValidationError(f"{instance} is out of {fmt}")
    elif (
        fmt == "date-time"
        and isinstance(instance, str)
        and not validator.FORMAT_CHECKER.conforms(instance, "date-time")
    ):
        yield ValidationError(f"{instance!r} is not a date-time")


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-validations": _cel, "x-kubernetes-list-type": _list_type, "format": _format},
)


def strict(node: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused wherever it names the fields."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    if "items" in node:
        node["items"] = strict(node["items"])
    return node


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(rf"{DNS_LABEL.pattern}(\.{DNS_LABEL.pattern})*")


def metadata_errors(meta: dict[str, Any]) -> list[str]:
    """ObjectMeta's checks that matter here: names, namespace, labels."""
    errors = []
    name = meta.get("name", "")
    if not DNS_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        errors.append(f"metadata.name {name!r} is not a DNS subdomain")
    namespace = meta.get("namespace", "")
    if not DNS_LABEL.fullmatch(namespace) or len(namespace) > 63:
        errors.append(f"metadata.namespace {namespace!r} is not a DNS label")
    for key, value in (meta.get("labels") or {}).items():
        if not cel_rule(LABEL_KEY_RULE)([key]) or not LABEL_VALUE.fullmatch(value):
            errors.append(f"label {key}={value} is not a label")
    return errors


# ObjectMeta's label syntax, the same the CRD's rule asks of nodeSelector keys.
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LABEL_KEY_RULE = (
    "self.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$') && !k.matches('^[^/]{254,}/'))"
)


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server stores it."""
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(node["items"], item) for item in value]
    return value


def admission(schema: dict[str, Any]) -> Callable[[dict[str, Any]], list[ValidationError]]:
    validator = KubeValidator(strict(schema), format_checker=KubeValidator.FORMAT_CHECKER)

    def errors(obj: dict[str, Any]) -> list[ValidationError]:
        found = list(validator.iter_errors(apply_defaults(schema, obj)))
        if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
            found.append(ValidationError(f"not a {KIND}: {obj.get('apiVersion')}"))
        for problem in metadata_errors(obj.get("metadata") or {}):
            found.append(ValidationError(problem, path=["metadata"]))
        return found

    return errors


def messages(errors: list[ValidationError]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# -- the CRD itself --------------------------------------------------------------------


def test_the_crd_is_the_resource_the_controller_uses(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    assert crd["metadata"]["name"] == CRD_NAME
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == (GROUP, "Namespaced")
    assert spec["names"] == {
        "kind": KIND,
        "listKind": f"{KIND}List",
        "plural": PLURAL,
        "singular": "cachedmodel",
        "shortNames": ["cmodel"],  # cm is ConfigMap's
        "categories": ["cachefs"],
    }
    (served,) = spec["versions"]
    assert (served["name"], served["served"], served["storage"]) == (VERSION, True, True)
    assert served["subresources"] == {"status": {}}  # nodes write status, users the spec


def test_the_crd_schema_is_structural(version: dict[str, Any]) -> None:
    schema = version["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []
    assert schema["required"] == ["spec"]
    # Every CEL rule is one the evaluator runs (it raises on another form).
    rules = []

    def collect(node: dict[str, Any]) -> None:
        rules.extend(rule["rule"] for rule in node.get("x-kubernetes-validations", []))
        for sub in node.get("properties", {}).values():
            collect(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                collect(node[key])

    collect(schema)
    assert rules, "the nodeSelector's keys are checked by a rule"
    for rule in rules:
        cel_rule(rule)
    # The API server estimates each rule's cost and refuses a CRD whose rules could run
    # too long: a rule over every key of a map needs the map's size bounded.
    selector = schema["properties"]["spec"]["properties"]["nodeSelector"]
    assert selector["maxProperties"] <= 100
    assert selector["additionalProperties"]["maxLength"] == 63


def test_the_structural_check_finds_what_the_api_server_refuses() -> None:
    assert structural_problems({"type": "object", "properties": {"a": {}}}) == [".a: no type"]
    mixed = {"type": "object", "properties": {}, "additionalProperties": False}
    assert structural_problems(mixed) == ["<root>: properties and additionalProperties together"]
    keyed = {
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
    }
    assert structural_problems(keyed) == ["<root>: map key name is neither required nor defaulted"]
    bad_default = {"type": "string", "enum": ["A"], "default": "B"}
    assert structural_problems(bad_default)[0].startswith("<root>: the default does not")


def test_the_cel_evaluator_runs_its_forms_and_refuses_others() -> None:
    keys = cel_rule(LABEL_KEY_RULE)
    assert keys({"pool": "gpu", "nvidia.com/gpu.present": "true"})
    assert not keys({"a/b/c": ""}) and not keys({"a" * 254 + "/b": ""}) and not keys(["-a"])
    with pytest.raises(AssertionError, match="teach the CEL evaluator"):
        cel_rule("self.size() <= 3")
    with pytest.raises(AssertionError, match="teach the CEL evaluator"):
        cel_rule("self.all(k, k.startsWith('a'))")


def test_the_printer_columns_show_source_ready_size_and_age(version: dict[str, Any]) -> None:
    columns = [
        (c["name"], c["type"], c["jsonPath"])
        for c in version["additionalPrinterColumns"]
        if not c.get("priority")
    ]
    assert columns == [
        ("Source", "string", ".spec.source"),
        ("Ready", "string", ".status.ready"),
        ("Size", "string", ".status.size"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    wide = [c["jsonPath"] for c in version["additionalPrinterColumns"] if c.get("priority")]
    assert wide == [".status.resolved.version"]
    # Every column's path is a field of the schema (kubectl shows <none> for a typo).
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        node = schema
        for part in column["jsonPath"].lstrip(".").split("."):
            node = node["properties"][part] if part != "creationTimestamp" else {"type": "string"}
        assert node["type"] == "string", column


def test_the_chart_installs_the_crd_before_its_models_and_never_deletes_it(
    chart, crd: dict[str, Any]
) -> None:
    """The CRD is under crds/, which Helm applies before it builds the release's objects
    (a CRD among the templates would fail an install that has models: Helm maps every
    object's kind before it creates any), and never upgrades or deletes."""
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    objects = render(chart, CASES["everything"])
    assert of_kind(objects, "CustomResourceDefinition") == []
    assert of_kind(objects, KIND)
    assert "{{" not in chart.crds[0]["data"]  # Helm does not render crds/: no template here


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean_with_models(case: str) -> None:
    values = CASES[case]
    reconciled = (values.get("config") or {}).get("models", {}).get("enabled", True)
    if reconciled and not values.get("models"):
        values = {**values, "models": [{"source": "s3://models/llama-3-8b/"}]}
    report = helm_python.lint(CHART, values, namespace=NAMESPACE, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# -- the objects -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_validates(chart, check, case: str) -> None:
    objects = render(chart, CASES[case])
    for obj in objects:
        if obj["apiVersion"] == API_VERSION:
            assert messages(check(obj)) == [], obj["metadata"]["name"]
        elif not obj["apiVersion"].startswith("monitoring.coreos.com/"):  # test_chart.py's
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    models = of_kind(objects, KIND)
    assert len(models) == len(CASES[case].get("models", []))


def test_the_controller_learns_its_node_and_namespace_from_the_downward_api(chart) -> None:
    daemonset = one(render(chart), "DaemonSet")
    (node,) = [
        c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "node"
    ]
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in node["env"]
    }
    assert env["NODE_NAME"] == "spec.nodeName"  # its entry of status.nodes, its labels
    assert env["POD_NAMESPACE"] == "metadata.namespace"


def test_the_controller_may_make_each_call_it_makes(chart) -> None:
    """node/models/api.py's calls, each against the ServiceAccount's grants."""
    objects = render(chart)
    calls = {  # (where, group, resource, verb)
        ("cluster", GROUP, PLURAL, "list"),
        ("cluster", GROUP, PLURAL, "watch"),
        ("cluster", GROUP, PLURAL, "patch"),  # the finalizer, with a resourceVersion
        ("cluster", GROUP, f"{PLURAL}/status", "patch"),  # server-side apply of status
        ("cluster", "", "nodes", "get"),  # the node's own labels
        ("namespace", "coordination.k8s.io", "leases", "get"),
        ("namespace", "coordination.k8s.io", "leases", "create"),
        ("namespace", "coordination.k8s.io", "leases", "update"),
    }
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    grants = set()
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding[
            "subjects"
        ]
        kind = binding["roleRef"]["kind"]
        (role,) = [
            r for r in of_kind(objects, kind) if r["metadata"]["name"] == binding["roleRef"]["name"]
        ]
        if kind == "Role":
            assert role["metadata"]["namespace"] == NAMESPACE
            assert rendered_lease_namespace(objects) == NAMESPACE
        where = "cluster" if kind == "ClusterRole" else "namespace"
        for rule in role["rules"]:
            grants |= {
                (where, g, r, v)
                for g in rule["apiGroups"]
                for r in rule["resources"]
                for v in rule["verbs"]
            }
    assert calls <= grants, sorted(calls - grants)


def rendered_lease_namespace(objects: list[dict]) -> str:
    config = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])
    return config["models"]["lease_namespace"]


def _example_models() -> list[dict[str, Any]]:
    return [
        obj
        for path in sorted(EXAMPLES.rglob("*.yaml"))
        for obj in yaml.safe_load_all(path.read_text())
        if obj and obj.get("kind") == KIND
    ]


def _docs_models() -> list[dict[str, Any]]:
    fences = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    return [obj for text in fences if (obj := yaml.safe_load(text)) and obj.get("kind") == KIND]


def test_the_example_and_the_documented_models_validate(check) -> None:
    examples, documented = _example_models(), _docs_models()
    assert [m["metadata"]["name"] for m in examples] == ["llama-3-8b"]
    assert len(documented) >= 2 and any("status" in m for m in documented)
    for obj in examples + documented:
        assert messages(check(obj)) == [], obj["metadata"]["name"]
    (example,) = examples
    assert example["spec"]["nodeSelector"]  # kept on a GPU pool
    # The Deployment on it requires the label the nodes put on for its source.
    deployment = yaml.safe_load((EXAMPLES / "vllm-cachedmodel.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = terms["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": label_key(example["spec"]["source"]), "operator": "In", "values": ["ready"]}
    ]
    (volume,) = [v for v in pod["volumes"] if "csi" in v]
    assert volume["csi"]["volumeAttributes"] == {"cachedModel": example["metadata"]["name"]}
    assert deployment["metadata"]["namespace"] == example["metadata"]["namespace"]


def test_the_documented_get_output_has_the_printer_columns(version: dict[str, Any]) -> None:
    headers = [line.split() for line in DOCS.read_text().splitlines() if line.startswith("NAME ")]
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    narrow = [
        c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert ["NAME", *narrow] in headers  # kubectl get cachedmodels
    assert ["NAME", *columns] in headers  # kubectl get cachedmodels -o wide


def test_defaults_are_pinned_and_pin(version: dict[str, Any], check) -> None:
    schema = version["schema"]["openAPIV3Schema"]
    obj = model()
    assert check(obj) == []
    stored = apply_defaults(schema, obj)
    assert stored["spec"] == {
        "source": obj["spec"]["source"],
        "updatePolicy": "Pinned",
        "pin": True,
    }


def model(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "llama-3-8b", "namespace": "serving"},
        "spec": {"source": "s3://models/llama-3-8b/", **spec},
    }


def with_status(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with a status as the nodes write it."""
    return {
        **obj,
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Resolved",
                    "status": "True",
                    "reason": "Resolved",
                    "message": "2 objects, 1.0 KiB, version sha256:00",
                    "lastTransitionTime": "2025-06-02T09:14:05Z",
                    "observedGeneration": 1,
                },
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Filling",
                    "message": "0 of 1 nodes ready",
                    "lastTransitionTime": "2025-06-02T09:14:05Z",
                    "observedGeneration": 1,
                },
            ],
            "resolved": {
                "version": "sha256:00",
                "objects": 2,
                "bytes": 1024,
                "resolvedAt": "2025-06-02T09:14:05Z",
                "manifest": [
                    {"url": "s3://models/llama-3-8b/a", "version": 'etag:"1"', "size": 512},
                    {"url": "s3://models/llama-3-8b/b", "version": "v", "size": 512, "etag": ""},
                ],
            },
            "previous": {"version": "sha256:ff", "objects": 2, "bytes": 1000},
            "nodes": [
                {
                    "name": "gpu-node-1",
                    "phase": "Filling",
                    "version": "sha256:00",
                    "bytesDone": 512,
                    "bytesTotal": 1024,
                    "lastError": "",
                    "updatedAt": "2025-06-02T09:14:06Z",
                },
                {"name": "gpu-node-2", "phase": "Pending", "version": ""},
            ],
            "readyNodes": 0,
            "desiredNodes": 1,
            "ready": "0/1",
            "size": "1.0 KiB",
        },
    }


GOOD = {  # accepted: what a user may well write
    "a prefix on S3": model(),
    "one object over HTTPS": model(source="https://models.example.com/llama/model.safetensors"),
    "a hub revision after @ in the path": model(source="hf://meta-llama/Llama-3.1-8B@main/"),
    "gcs and abfs spellings": model(source="gcs://bucket/llama/"),
    "an Azure container": model(source="abfs://weights/llama/"),
    "a quoted ETag as revision": model(revision='"9b2cf535f27731c974343645a3985328"'),
    "every field": model(
        revision="0123abcd",
        updatePolicy="Latest",
        nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": ""},
        tier="memory",
        pin=False,
    ),
    "a status as the nodes write it": with_status(model()),
}


@pytest.mark.parametrize("case", GOOD)
def test_good_objects_are_accepted(check, case: str) -> None:
    assert messages(check(GOOD[case])) == []


def _set(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (a valid model with a status) with the field at ``path`` set;
    ``value`` DELETE removes it."""
    obj = copy.deepcopy(base or with_status(model()))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = obj
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


DELETE = object()
LONG_PREFIX = "a" * 254 + "/pool"

BAD = {  # the object, and the field the API server must name
    "a scheme cachefs does not read": (_set("spec.source", "ftp://models/llama/"), "spec.source"),
    "a local file": (_set("spec.source", "file:///models/llama/"), "spec.source"),
    "no scheme": (_set("spec.source", "models/llama-3-8b/"), "spec.source"),
    "a scheme in capitals": (_set("spec.source", "S3://models/llama/"), "spec.source"),
    "userinfo in the URL": (_set("spec.source", "s3://key:secret@models/llama/"), "spec.source"),
    "a token as the user": (_set("spec.source", "https://hf_x@hub.example/m/"), "spec.source"),
    "whitespace in the source": (_set("spec.source", "s3://models/llama 3/"), "spec.source"),
    "a newline in the source": (_set("spec.source", "s3://models/llama\n/"), "spec.source"),
    "a source too long": (_set("spec.source", "s3://m/" + "a" * 2042), "spec.source"),
    "no source": (_set("spec.source", DELETE), "spec"),
    "no spec": (_set("spec", DELETE), "<root>"),
    "whitespace in the revision": (_set("spec.revision", "v1 final"), "spec.revision"),
    "a tab in the revision": (_set("spec.revision", "v1\tfinal"), "spec.revision"),
    "an empty revision": (_set("spec.revision", ""), "spec.revision"),
    "a revision too long": (_set("spec.revision", "a" * 257), "spec.revision"),
    "a revision not in ASCII": (_set("spec.revision", "révision"), "spec.revision"),
    "an unknown update policy": (_set("spec.updatePolicy", "Always"), "spec.updatePolicy"),
    "an unknown spec field": (_set("spec.replicas", 3), "spec"),
    "an unknown top-level field": (_set("data", {}), "<root>"),
    "a tier in capitals": (_set("spec.tier", "Memory"), "spec.tier"),
    "a tier ending in -": (_set("spec.tier", "fast-"), "spec.tier"),
    "pin as a word": (_set("spec.pin", "yes"), "spec.pin"),
    "a nodeSelector key with two slashes": (
        _set("spec.nodeSelector", {"a/b/c": "x"}),
        "spec.nodeSelector",
    ),
    "a nodeSelector key with a space": (
        _set("spec.nodeSelector", {"node pool": "x"}),
        "spec.nodeSelector",
    ),
    "a nodeSelector prefix too long": (
        _set("spec.nodeSelector", {LONG_PREFIX: "x"}),
        "spec.nodeSelector",
    ),
    "a nodeSelector value not a label value": (
        _set("spec.nodeSelector", {"pool": "gpu h100"}),
        "spec.nodeSelector.pool",
    ),
    "a nodeSelector value not a string": (
        _set("spec.nodeSelector", {"nvidia.com/gpu.present": True}),
        "spec.nodeSelector.nvidia.com/gpu.present",
    ),
    "a phase nobody writes": (_set("status.nodes.0.phase", "Done"), "status.nodes.0.phase"),
    "a node entry without a name": (_set("status.nodes.1.name", DELETE), "status.nodes.1"),
    "two entries for one node": (
        _set("status.nodes.1.name", "gpu-node-1"),
        "status.nodes",
    ),
    "bytes as a size string": (
        _set("status.nodes.0.bytesDone", "512 B"),
        "status.nodes.0.bytesDone",
    ),
    "negative bytes": (_set("status.resolved.bytes", -1), "status.resolved.bytes"),
    "bytes past int64": (_set("status.resolved.bytes", 2**63), "status.resolved.bytes"),
    "an error too long": (_set("status.nodes.0.lastError", "x" * 4097), "status.nodes.0.lastError"),
    "a time that is not a time": (
        _set("status.nodes.0.updatedAt", "yesterday"),
        "status.nodes.0.updatedAt",
    ),
    "a condition status of another word": (
        _set("status.conditions.0.status", "Yes"),
        "status.conditions.0.status",
    ),
    "a reason that is not CamelCase": (
        _set("status.conditions.1.reason", "still filling"),
        "status.conditions.1.reason",
    ),
    "a condition without a reason": (
        _set("status.conditions.1.reason", DELETE),
        "status.conditions.1",
    ),
    "two conditions of one type": (
        _set("status.conditions.1.type", "Resolved"),
        "status.conditions",
    ),
    "a message too long": (
        _set("status.conditions.0.message", "m" * 32769),
        "status.conditions.0.message",
    ),
    "a resolved manifest without a version": (
        _set("status.resolved.manifest.0.version", DELETE),
        "status.resolved.manifest.0",
    ),
    "a manifest past 10000 objects": (
        _set(
            "status.resolved.manifest",
            [{"url": f"s3://m/{i}", "version": "v", "size": 1} for i in range(10001)],
        ),
        "status.resolved.manifest",
    ),
    "a previous version with its manifest": (
        _set("status.previous.manifest", []),
        "status.previous",
    ),
    "a name that is no DNS subdomain": (_set("metadata.name", "Llama_3"), "metadata"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_objects_are_refused_at_the_field_at_fault(check, case: str) -> None:
    obj, where = BAD[case]
    errors = check(obj)
    assert errors, f"{case}: accepted"
    paths = {".".join(map(str, e.absolute_path)) or "<root>" for e in errors}
    assert paths == {where}, messages(errors)
