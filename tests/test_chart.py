"""The Helm chart (charts/cachefs), rendered by Helm's own engine.

Every rendered object validates against the Kubernetes schemas; RBAC, privileges and
the values schema are checked as rules; and the wiring is real: the rendered
DaemonSet's node and CSI containers run as processes with their volumes mapped to a
temporary directory, and a NodePublishVolume goes through the socket path the
registrar gives kubelet.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import helm_python
import kubernetes_validate
import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, mounts_under
from daemon import CachefsProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_api import KubeApiServer
from safetensors.numpy import save as save_safetensors

from cachefs.csi.proto import csi_pb2 as csi
from cachefs.csi.proto import csi_pb2_grpc as csi_grpc
from cachefs.node.callers import Caller
from cachefs.node.config import load_config
from cachefs.node.labels import label_key
from cachefs.node.policy import Policy

CHART = REPO_ROOT / "charts" / "cachefs"
EXAMPLES = REPO_ROOT / "examples"
KUBE_VERSION = "1.33.0"
RELEASE = NAMESPACE = "cachefs"
DRIVER = "csi.cachefs.dev"

EVERYTHING = {  # every optional part of the chart switched on
    "cache": {
        "disk": {"hostPath": "/mnt/nvme/cachefs", "quota": "800GiB"},
        "memory": {"enabled": True, "type": "emptyDir", "quota": "16GiB", "sizeLimit": "17GiB"},
    },
    "peerToken": {"existingSecret": "cachefs-peer-token", "key": "shared"},
    "origins": {
        "envFromSecret": "s3-credentials",
        "env": [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/run/origin/key.json"}],
        "secretFiles": {"secretName": "gcs-key", "mountPath": "/var/run/origin"},
    },
    "config": {
        "group": "2000",
        "origins": [{"prefix": "s3://models/", "options": {"anon": False}}],
        "retry": {"attempts": 8},
        "server": {"socket_group": "2000", "shutdown_grace": 60},
        "models": {"enabled": True, "resync": 30},
        "policy": [
            {"callers": ["pod"], "allow": ["view"], "sources": ["s3://models/"]},
            {
                "callers": ["namespace:team-a"],
                "allow": ["view", "read"],
                "sources": ["gs://team-a/"],
            },
        ],
    },
    "models": [
        {"name": "llama-3-8b", "source": "s3://models/llama-3-8b/", "pin": True},
        {
            "namespace": "team-a",
            "source": "gs://team-a/mistral/",
            "revision": "1712345678901234",
            "updatePolicy": "Latest",
            "nodeSelector": {"pool": "cpu", "cachefs.io/tier": "nvme"},
            "tier": "memory",
            "pin": False,
        },
    ],
    "priorityClassName": "system-node-critical",
    "kubeletDir": "/var/data/kubelet",
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "imagePullSecrets": [{"name": "regcred"}],
}
NO_API = {
    "config": {
        "cluster": {"membership": "none", "label_node": False},
        "models": {"enabled": False},
    }
}

VALUES_FILES = sorted(EXAMPLES.glob("values-*.yaml"))
CASES = {
    "defaults": {},
    "everything": EVERYTHING,
    "no-api": NO_API,
    **{path.name: yaml.safe_load(path.read_text()) for path in VALUES_FILES},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> list[dict]:
    """The chart's objects (NOTES.txt left out), template file by template file."""
    manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return [
        obj
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for obj in yaml.safe_load_all(text)
        if obj
    ]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = of_kind(objects, kind)
    return found


def pod_specs(objects: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("DaemonSet", "Job")]


def containers_of(daemonset: dict) -> dict[str, dict]:
    return {c["name"]: c for c in daemonset["spec"]["template"]["spec"]["containers"]}


def rendered_config(objects: list[dict]) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])


# -- Helm's engine and the Kubernetes schemas ---------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_reports_no_errors_or_warnings(case: str) -> None:
    report = helm_python.lint(CHART, CASES[case], namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def _check_service_monitor(obj: dict) -> None:
    """The Prometheus Operator's CRD: what it requires, and nothing Kubernetes knows."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == NAMESPACE
    spec = obj["spec"]
    assert isinstance(spec["selector"]["matchLabels"], dict) and spec["selector"]["matchLabels"]
    assert spec["endpoints"] and all(isinstance(e["port"], str) for e in spec["endpoints"])


@pytest.mark.parametrize("case", CASES)
def test_every_object_validates_against_the_kubernetes_schemas(chart, case: str) -> None:
    objects = render(chart, CASES[case])
    kinds = {obj["kind"] for obj in objects}
    assert {"DaemonSet", "CSIDriver", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            _check_service_monitor(obj)
        elif obj["apiVersion"].startswith("cachefs.io/"):
            continue  # the chart's own CRD: tests/test_crd.py validates against its schema
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_the_rendered_config_is_one_the_node_accepts(chart, case: str, tmp_path) -> None:
    objects = render(chart, CASES[case])
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["config.yaml"])
    config = load_config(path, environ={})
    assert [t.name for t in config.tiers][-1] == "disk"  # fastest first; labels live in the last
    assert all(str(t.path).startswith("/var/cache/cachefs/") for t in config.tiers)
    service = one(objects, "Service")
    if config.cluster.membership == "kubernetes":
        assert config.cluster.kubernetes_service == service["metadata"]["name"]
        assert config.cluster.kubernetes_namespace == NAMESPACE
        assert config.cluster.kubernetes_port_name in {p["name"] for p in service["spec"]["ports"]}
    daemonset = one(objects, "DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    node = containers_of(daemonset)["node"]
    assert {"name": "grpc", "containerPort": 7070, "protocol": "TCP"} in node["ports"]
    assert grpc_port["targetPort"] == "grpc"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert node[probe]["grpc"]["port"] == 7070  # the health service needs no token


def test_by_default_the_nodes_adapt_their_origin_limits(chart, tmp_path) -> None:
    """A fixed ``concurrency`` turns adaptation off, so the defaults must not set one;
    a user who sets it gets the fixed number."""
    for values, adaptive in (({}, True), ({"config": {"concurrency": 8}}, False)):
        path = tmp_path / "config.yaml"
        path.write_text(one(render(chart, values), "ConfigMap")["data"]["config.yaml"])
        config = load_config(path, environ={})
        assert config.origin_limit.adaptive is adaptive
        assert config.concurrency == (16 if adaptive else 8)


def test_the_csidriver_is_an_ephemeral_node_only_driver(chart) -> None:
    driver = one(render(chart), "CSIDriver")
    assert driver["metadata"]["name"] == DRIVER
    assert driver["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Ephemeral"],
        "fsGroupPolicy": "None",
    }


ALLOWED_RULES = {
    ("discovery.k8s.io", "endpointslices", "get"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "nodes", "get"),
    ("", "nodes", "patch"),
    ("authentication.k8s.io", "tokenreviews", "create"),
    # The model controller (node/models): every model, its finalizer and status; the
    # Lease of its leader, in the release's namespace.
    *{("cachefs.io", "cachedmodels", v) for v in ("get", "list", "watch", "update", "patch")},
    ("cachefs.io", "cachedmodels/status", "update"),
    ("cachefs.io", "cachedmodels/status", "patch"),
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
}
MODEL_RULES = {rule for rule in ALLOWED_RULES if rule[0] in ("cachefs.io", "coordination.k8s.io")}


def _grants(objects: list[dict], kind: str) -> set[tuple[str, str, str]]:
    grants = set()
    for role in of_kind(objects, kind):
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            grants |= {
                (group, resource, verb)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
    return grants


@pytest.mark.parametrize("case", CASES)
def test_rbac_grants_only_what_the_node_uses(chart, case: str) -> None:
    objects = render(chart, CASES[case])
    namespaced, cluster = _grants(objects, "Role"), _grants(objects, "ClusterRole")
    assert namespaced | cluster <= ALLOWED_RULES
    assert {r for _, r, _ in namespaced} <= {"endpointslices", "leases"}
    # Cluster-wide kinds, and CachedModels, which live in every namespace.
    kinds = {"nodes", "tokenreviews", "cachedmodels", "cachedmodels/status"}
    assert {r for _, r, _ in cluster} <= kinds
    config = rendered_config(objects)
    membership = config["cluster"]["membership"] == "kubernetes"
    assert any(r == "endpointslices" for _, r, _ in namespaced) == membership
    models = bool(config["models"].get("enabled"))
    assert (namespaced | cluster) & MODEL_RULES == (MODEL_RULES if models else set())
    label_node = bool(config["cluster"].get("label_node"))
    # Labels are patched; the model controller reads its Node's labels.
    assert (("", "nodes", "patch") in cluster) == label_node
    assert (("", "nodes", "get") in cluster) == (label_node or models)
    assert bool(of_kind(objects, "Role")) == (membership or models)
    if models:  # its Lease is where the Role reaches, whatever POD_NAMESPACE says
        assert config["models"]["lease_namespace"] == NAMESPACE
    # Pods prove who they are through TokenReviews, whatever else is on.
    assert ("authentication.k8s.io", "tokenreviews", "create") in cluster
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    roles = {(r["kind"], r["metadata"]["name"]) for r in objects if r["kind"].endswith("Role")}
    for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles  # ours only
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    assert pod["automountServiceAccountToken"] is True
    for spec in pod_specs(objects):
        if spec is not pod:
            assert spec["automountServiceAccountToken"] is False  # any other pod: no API


@pytest.mark.parametrize("case", CASES)
def test_only_the_csi_plugin_runs_privileged(chart, case: str) -> None:
    objects = render(chart, CASES[case])
    for spec in pod_specs(objects):
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        assert spec["enableServiceLinks"] is False  # no CACHEFS_* from a Service's name
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container.get("securityContext", {})
            mounts = container.get("volumeMounts", [])
            if container["name"] == "csi":
                assert context["privileged"] is True
                continue
            assert context.get("privileged", False) is False
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert set(context["capabilities"].get("add", [])) <= {"CHOWN"}
            assert all(m.get("mountPropagation", "None") == "None" for m in mounts)
    node = containers_of(one(objects, "DaemonSet"))["node"]
    config = rendered_config(objects)
    chown = config.get("group") or config["server"].get("socket_group")
    assert node["securityContext"]["capabilities"].get("add", []) == (["CHOWN"] if chown else [])
    assert node["securityContext"]["readOnlyRootFilesystem"] is True
    for job in of_kind(objects, "Job"):
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("case", CASES)
def test_kubelet_and_the_tiers_are_wired_at_the_expected_paths(chart, case: str) -> None:
    values = CASES[case]
    objects = render(chart, values)
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    containers = containers_of(one(objects, "DaemonSet"))
    kubelet = values.get("kubeletDir", "/var/lib/kubelet")

    def mounts(name: str) -> dict[str, dict]:
        return {m["mountPath"]: m for m in containers[name]["volumeMounts"]}

    pods = mounts("csi")[f"{kubelet}/pods"]  # kubelet's target paths are host paths
    assert pods["mountPropagation"] == "Bidirectional"
    assert volumes[pods["name"]]["hostPath"]["path"] == f"{kubelet}/pods"
    plugin_dir = volumes[mounts("csi")["/csi"]["name"]]["hostPath"]
    assert plugin_dir == {"path": f"{kubelet}/plugins/{DRIVER}", "type": "DirectoryOrCreate"}
    registration = volumes[mounts("node-driver-registrar")["/registration"]["name"]]
    assert registration["hostPath"]["path"] == f"{kubelet}/plugins_registry"
    registrar_args = containers["node-driver-registrar"]["args"]
    assert f"--kubelet-registration-path={kubelet}/plugins/{DRIVER}/csi.sock" in registrar_args
    assert "--csi-address=/csi/csi.sock" in registrar_args
    assert containers["liveness-probe"]["args"] == [
        "--csi-address=/csi/csi.sock",
        "--health-port=9808",
    ]
    assert containers["csi"]["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 9808, "protocol": "TCP"} in containers["csi"][
        "ports"
    ]

    for tier in rendered_config(objects)["tiers"]:  # the same volume at the same path in both
        node_mount, csi_mount = mounts("node")[tier["path"]], mounts("csi")[tier["path"]]
        assert node_mount["name"] == csi_mount["name"]
        assert not node_mount.get("readOnly") and not csi_mount.get("readOnly")
    memory = {**{"enabled": False}, **values.get("cache", {}).get("memory", {})}
    if memory["enabled"] and memory.get("type") == "emptyDir":
        size = memory.get("sizeLimit") or memory["quota"]
        assert volumes["cache-memory"]["emptyDir"] == {
            "medium": "Memory",
            "sizeLimit": size.replace("iB", "i"),
        }
    elif memory["enabled"]:
        assert volumes["cache-memory"]["hostPath"]["path"] == memory["hostPath"]
    else:
        assert "cache-memory" not in volumes


@pytest.mark.parametrize(
    ("quota", "quantity"),
    [
        ("16GiB", "16Gi"),
        ("16gib", "16Gi"),
        ("1.5GiB", "1.5Gi"),
        ("40G", "40G"),
        ("512M", "512M"),
        ("8kB", "8k"),
        ("1048576", "1048576"),
    ],
)
def test_a_memory_emptydir_is_as_large_as_the_tier(chart, quota: str, quantity: str) -> None:
    memory = {"enabled": True, "type": "emptyDir", "quota": quota}
    objects = render(chart, {"cache": {"memory": memory}})
    volumes = one(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == "cache-memory")
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": quantity}
    kubernetes_validate.validate(one(objects, "DaemonSet"), KUBE_VERSION, strict=True)


MODEL_SPEC_KEYS = ("source", "revision", "updatePolicy", "nodeSelector", "tier", "pin")


def derived_name(source: str) -> str:
    """The CachedModel name the chart gives an entry without one: the last segment of
    the source's path, lower case, each run of other characters one '-'."""
    path = re.sub(r"[?#].*$", "", source.split("://", 1)[1]).rstrip("/")
    return re.sub(r"[^a-z0-9]+", "-", path.rsplit("/", 1)[-1].lower()).strip("-")[:63].rstrip("-")


@pytest.mark.parametrize("case", CASES)
def test_models_become_cachedmodel_objects(chart, case: str) -> None:
    """Each entry of ``models`` is a CachedModel the nodes reconcile: no hook, no Job."""
    values = CASES[case]
    objects = render(chart, values)
    assert of_kind(objects, "Job") == []
    cached = of_kind(objects, "CachedModel")
    models = values.get("models", [])
    assert len(cached) == len(models)
    chart_labels = one(objects, "DaemonSet")["metadata"]["labels"]
    for obj, model in zip(cached, models, strict=True):
        assert obj["apiVersion"] == "cachefs.io/v1alpha1"
        meta = obj["metadata"]
        assert meta["namespace"] == model.get("namespace", NAMESPACE)
        assert meta["name"] == model.get("name") or derived_name(model["source"])
        assert "annotations" not in meta  # an ordinary release object, not a hook
        assert meta["labels"] == {**chart_labels, "app.kubernetes.io/component": "model"}
        assert obj["spec"] == {k: model[k] for k in MODEL_SPEC_KEYS if k in model}
    if models:
        assert rendered_config(objects)["models"]["enabled"] is True


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("s3://models/llama-3-8b/", "llama-3-8b"),
        ("hf://meta-llama/Llama-3.1-8B-Instruct", "llama-3-1-8b-instruct"),
        ("https://models.example.com/mistral/model.safetensors?download=1", "model-safetensors"),
        ("gs://bucket/", "bucket"),
        ("az://weights/--Qwen2__7B--/", "qwen2-7b"),
        ("s3://models/" + "x" * 80 + "-y/", "x" * 63),
    ],
)
def test_a_model_without_a_name_is_named_after_its_source(chart, source: str, name: str) -> None:
    assert derived_name(source) == name
    (obj,) = of_kind(render(chart, {"models": [{"source": source}]}), "CachedModel")
    assert obj["metadata"]["name"] == name


def test_models_that_cannot_be_objects_are_refused(chart) -> None:
    model = {"name": "llama", "source": "s3://models/llama/"}
    with pytest.raises(helm_python.HelmRenderError, match="two entries make the CachedModel"):
        render(chart, {"models": [model, {**model, "source": "s3://models/other/"}]})
    with pytest.raises(helm_python.HelmRenderError, match="cachefs/llama"):
        render(chart, {"models": [model, {"source": "s3://other/llama/"}]})  # derived: llama
    elsewhere = {**model, "namespace": "team-a"}  # the same name in another namespace
    assert len(of_kind(render(chart, {"models": [model, elsewhere]}), "CachedModel")) == 2
    with pytest.raises(helm_python.HelmRenderError, match="gives no name"):
        render(chart, {"models": [{"source": "s3://___/"}]})
    with pytest.raises(helm_python.HelmRenderError, match=r"config\.models\.enabled"):
        render(chart, {**NO_API, "models": [model]})


def test_the_token_secret_is_generated_or_referenced(chart) -> None:
    objects = render(chart)
    secret = one(objects, "Secret")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    volumes = one(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    token_volume = next(v for v in volumes if v["name"] == "token")["secret"]
    assert token_volume["secretName"] == secret["metadata"]["name"]
    assert token_volume["items"] == [{"key": "token", "path": "token"}]

    objects = render(chart, EVERYTHING)
    assert of_kind(objects, "Secret") == []
    volumes = one(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    token_volume = next(v for v in volumes if v["name"] == "token")["secret"]
    assert token_volume["secretName"] == "cachefs-peer-token"
    assert token_volume["items"] == [{"key": "shared", "path": "token"}]


BAD_VALUES = {  # values, and where the schema must find the fault
    "negative quota": ({"cache": {"disk": {"quota": "-5GiB"}}}, "/cache/disk/quota"),
    "quota without a number": (
        {"cache": {"memory": {"enabled": True, "quota": "lots"}}},
        "/cache/memory/quota",
    ),
    "unknown top-level key": ({"replicaCount": 3}, ""),
    "unknown config key": ({"config": {"blocksize": "8MiB"}}, "/config"),
    "listener set in config": ({"config": {"server": {"address": "0.0.0.0:1"}}}, "/config/server"),
    "model without a source": ({"models": [{"name": "llama"}]}, "/models/0"),
    "model source not a URL": (
        {"models": [{"name": "llama", "source": "llama-3-8b"}]},
        "/models/0/source",
    ),
    "model name not a DNS name": (
        {"models": [{"name": "Llama_3", "source": "s3://m/l/"}]},
        "/models/0/name",
    ),
    "model source of another scheme": (
        {"models": [{"source": "ftp://models/llama/"}]},
        "/models/0/source",
    ),
    "model source with a password": (
        {"models": [{"source": "https://user:secret@hub.example.com/llama/"}]},
        "/models/0/source",
    ),
    "model revision with a space": (
        {"models": [{"source": "s3://m/l/", "revision": "v1 final"}]},
        "/models/0/revision",
    ),
    "model tier in upper case": (
        {"models": [{"source": "s3://m/l/", "tier": "Memory"}]},
        "/models/0/tier",
    ),
    "model update policy unknown": (
        {"models": [{"source": "s3://m/l/", "updatePolicy": "Always"}]},
        "/models/0/updatePolicy",
    ),
    "model nodeSelector key not a label": (  # Helm reports a bad key at the root
        {"models": [{"source": "s3://m/l/", "nodeSelector": {"pool/gpu/h100": "true"}}]},
        "",
    ),
    "model in a namespace that is no DNS label": (
        {"models": [{"source": "s3://m/l/", "namespace": "Team_A"}]},
        "/models/0/namespace",
    ),
    "prefetch Jobs, gone with CachedModels": ({"prefetch": {"backoffLimit": 6}}, ""),
    "the models Lease's namespace, the chart's": (
        {"config": {"models": {"lease_namespace": "kube-system"}}},
        "/config/models",
    ),
    "relative kubeletDir": ({"kubeletDir": "var/lib/kubelet"}, "/kubeletDir"),
    "kubeletDir with a trailing slash": ({"kubeletDir": "/var/lib/kubelet/"}, "/kubeletDir"),
    "kubeletDir with ..": ({"kubeletDir": "/var/lib/../kubelet"}, "/kubeletDir"),
    "unknown memory tier type": (
        {"cache": {"memory": {"enabled": True, "type": "ramdisk"}}},
        "/cache/memory/type",
    ),
    "unknown membership": (
        {"config": {"cluster": {"membership": "dns"}}},
        "/config/cluster/membership",
    ),
    "publish timeout past kubelet's": (
        {"config": {"csi": {"publish_timeout": 300}}},
        "/config/csi/publish_timeout",
    ),
    "socket mode with rights for others": (
        {"config": {"server": {"socket_mode": "0666"}}},
        "/config/server/socket_mode",
    ),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_the_values_schema_rejects_bad_values(chart, case: str) -> None:
    values, where = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError) as refused:
        chart.validate_schema(chart.merge_values(values))  # as an install merges them
    assert f"at '{where}'" in str(refused.value)
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(chart, values)
    assert f"at '{where}'" in str(refused.value)


def test_lint_reports_bad_values() -> None:
    report = helm_python.lint(CHART, BAD_VALUES["negative quota"][0])
    assert report["errors"] and any("quota" in error for error in report["errors"])


# -- the examples --------------------------------------------------------------------


def _example_manifests() -> list[tuple[str, dict]]:
    return [
        (str(path.relative_to(EXAMPLES)), obj)
        for path in sorted(EXAMPLES.rglob("*.yaml"))
        if not path.name.startswith("values-")
        for obj in yaml.safe_load_all(path.read_text())
        if obj
    ]


def test_example_manifests_validate_and_match_the_gpu_pool_values() -> None:
    manifests = _example_manifests()
    assert {name for name, _ in manifests} >= {
        "vllm/deployment.yaml",
        "loader/job.yaml",
        "cachedmodel.yaml",
        "vllm-cachedmodel.yaml",
    }
    models = {
        (obj["metadata"]["namespace"], obj["metadata"]["name"]): obj
        for _, obj in manifests
        if obj["kind"] == "CachedModel"
    }
    gpu_values = yaml.safe_load((EXAMPLES / "values-gpu-pool.yaml").read_text())
    policy = Policy.from_config(gpu_values["config"]["policy"])
    for name, obj in manifests:
        if obj["kind"] == "CachedModel":
            continue  # the chart's own kind: tests/test_crd.py validates it against the CRD
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        if "template" not in obj.get("spec", {}):
            continue
        namespace = obj["metadata"]["namespace"]
        pod = obj["spec"]["template"]["spec"]
        sources = []
        for volume in pod["volumes"]:
            if volume.get("csi", {}).get("driver") != DRIVER:
                continue
            attributes = volume["csi"]["volumeAttributes"]
            if "cachedModel" in attributes:  # a CachedModel of the pod's namespace
                model = models[(namespace, attributes["cachedModel"])]
                sources.append(model["spec"]["source"])
                # The pods go where the model is kept.
                assert model["spec"].get("nodeSelector", {}).items() <= pod["nodeSelector"].items()
            else:
                sources.append(attributes["source"])
        caller = Caller("pod", namespace=namespace, service_account="default")
        for source in sources:  # a volume's pod may view its source
            policy.require(caller, "view", source)
        if not sources:  # a pod on the node's socket: its token, and rights to its model
            source = pod["containers"][0]["command"][-1]
            policy.require(caller, "prefetch", source)
            _assert_projects_a_cachefs_token(pod)
        affinity = pod["affinity"]["nodeAffinity"]
        terms = [
            t["preference"]
            for t in affinity.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ]
        required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})
        terms += required.get("nodeSelectorTerms", [])
        keys = {e["key"] for t in terms for e in t["matchExpressions"]}
        model = sources[0] if sources else pod["containers"][0]["command"][-1]
        assert keys == {label_key(model)}, f"{name}: regenerate with `cachefs label {model}`"


def _assert_projects_a_cachefs_token(pod: dict[str, Any]) -> None:
    """The pod mounts a ServiceAccount token for the audience cachefs where
    CACHEFS_POD_TOKEN_FILE points."""
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", ())}
    token_file = Path(env["CACHEFS_POD_TOKEN_FILE"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    projected = {
        v["name"]: s["serviceAccountToken"]
        for v in pod["volumes"]
        for s in v.get("projected", {}).get("sources", ())
        if "serviceAccountToken" in s
    }
    (name,) = [n for n, path in mounts.items() if Path(path) == token_file.parent]
    assert projected[name]["audience"] == "cachefs"
    assert projected[name]["path"] == token_file.name


# -- the wiring, for real --------------------------------------------------------------

FIELDS = {"status.podIP": "127.0.0.1", "metadata.namespace": NAMESPACE, "spec.nodeName": "node-1"}
BLOCK = 64 * 1024


class Host:
    """A node's filesystem under a temporary root, as the rendered pods see it.

    hostPath volumes map to ``root/host/<path>``; a pod's emptyDirs to
    ``root/<pod>/emptyDir/<volume>``, its ConfigMap and Secret volumes to directories
    there holding the rendered objects' keys (or the test's stand-in Secrets).
    """

    def __init__(
        self,
        root: Path,
        objects: list[dict],
        secrets: dict[str, dict],
        listen: dict[int, str] | None = None,
    ) -> None:
        self.root = root
        self.listen = listen or {}
        self.secrets = {
            s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in s["data"].items()}
            for s in of_kind(objects, "Secret")
        } | {name: {k: v.encode() for k, v in data.items()} for name, data in secrets.items()}
        self.config_maps = {
            c["metadata"]["name"]: {k: v.encode() for k, v in c["data"].items()}
            for c in of_kind(objects, "ConfigMap")
        }

    def host_path(self, path: str) -> Path:
        assert path.startswith("/"), path
        return self.root / "host" / path.lstrip("/")

    def pod(self, name: str, spec: dict) -> Pod:
        return Pod(self, name, spec)


class Pod:
    def __init__(self, host: Host, name: str, spec: dict) -> None:
        self.host, self.spec = host, spec
        self.volumes = {v["name"]: self._provision(host.root / name, v) for v in spec["volumes"]}

    def _provision(self, root: Path, volume: dict) -> Path:
        if "hostPath" in volume:
            path = self.host.host_path(volume["hostPath"]["path"])
            path.mkdir(parents=True, exist_ok=True)  # kubelet's own directories exist already
            return path
        kind = next(k for k in ("emptyDir", "configMap", "secret") if k in volume)
        path = root / kind / volume["name"]
        path.mkdir(parents=True)
        if kind == "emptyDir":
            return path
        source = volume[kind]
        if kind == "configMap":
            data = self.host.config_maps[source["name"]]
        else:
            data = self.host.secrets[source["secretName"]]
        for item in source.get("items") or [{"key": k, "path": k} for k in data]:
            (path / item["path"]).write_bytes(data[item["key"]])
        return path

    def container(self, name: str) -> Container:
        spec = next(c for c in self.spec["containers"] if c["name"] == name)
        return Container(self, spec)


class Container:
    """One container of the pod: its paths, arguments and environment, mapped."""

    def __init__(self, pod: Pod, spec: dict) -> None:
        self.host, self.spec = pod.host, spec
        self.mounts = sorted(
            ((m["mountPath"], pod.volumes[m["name"]]) for m in spec.get("volumeMounts", [])),
            key=lambda mount: -len(mount[0]),
        )

    def path(self, path: str) -> Path:
        """Where a path inside the container lives on the host: on a volume, always."""
        for mount_path, directory in self.mounts:
            if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
                return directory / os.path.relpath(path, mount_path)
        raise AssertionError(f"{self.spec['name']} uses {path}, which is on no volume")

    def value(self, value: str) -> str:
        """A flag or variable with its container paths mapped, wildcard listeners on
        loopback (at the address ``Host.listen`` gives their port, else a free port)."""
        if value.startswith("0.0.0.0:"):
            return self.host.listen.get(int(value.rpartition(":")[2]), "127.0.0.1:0")
        flag, equals, rest = value.partition("=") if value.startswith("--") else ("", "", value)
        if rest.startswith("unix://"):
            return f"{flag}{equals}unix://{self.path(rest.removeprefix('unix://'))}"
        if rest.startswith("/"):
            return f"{flag}{equals}{self.path(rest)}"
        return value

    def flag(self, name: str) -> str:
        """The value the container's arguments give ``name``, as written."""
        args = self.spec["args"]
        return args[args.index(name) + 1]

    def argv(self) -> list[str]:
        assert self.spec["command"] == ["cachefs"]  # the image's console script
        return [self.value(arg) for arg in self.spec["args"]]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in self.spec.get("envFrom", []):
            env |= {
                k: v.decode() for k, v in self.host.secrets[source["secretRef"]["name"]].items()
            }
        for var in self.spec.get("env", []):
            if "value" in var:
                env[var["name"]] = self.value(var["value"])
            else:
                env[var["name"]] = FIELDS[var["valueFrom"]["fieldRef"]["fieldPath"]]
        return env


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A root short enough for unix socket paths (108 bytes) under deep host paths;
    every mount left under it is undone at teardown."""
    root = Path(tempfile.mkdtemp(prefix="cachefs-chart-", dir="/tmp"))
    yield root
    for target in reversed(mounts_under(root)):
        subprocess.run(["umount", "-l", target], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def kube_api() -> Iterator[KubeApiServer]:
    """A Kubernetes API stand-in: the node checks pods' tokens with its TokenReviews."""
    with KubeApiServer(NAMESPACE) as server:
        yield server


@pytest.fixture
def processes() -> Iterator[list[CachefsProcess]]:
    started: list[CachefsProcess] = []
    yield started
    for process in started:
        process.kill()


def _model(s3) -> dict[str, bytes]:
    weights = {"embed": np.arange(3 * BLOCK // 4, dtype=np.float32).reshape(-1, 64)}
    files = {
        "models/llama/config.json": b'{"hidden_size": 64}',
        "models/llama/model.safetensors": save_safetensors(weights),
        "models/llama/tokenizer/tokenizer.json": os.urandom(BLOCK + 5),
    }
    for key, data in files.items():
        s3.put(key, data)
    return {key.removeprefix("models/llama/"): data for key, data in files.items()}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_cli(container: Container, argv: list[str]) -> subprocess.CompletedProcess:
    """A one-shot ``cachefs`` command with the container's environment (no other
    CACHEFS_ variable), as ``kubectl exec`` or a Job would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    return subprocess.run(
        [sys.executable, "-m", "cachefs.cli", *argv],
        env={**env, **container.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.exercises("--cluster", "--endpoint", "CACHEFS_TOKEN_FILE")
def test_the_rendered_daemonset_serves_a_csi_volume(
    chart, s3, short_root, processes, monkeypatch, kube_api
) -> None:
    prefix = f"s3://{s3.name}/models/"
    source = f"{prefix}llama/"
    values = {
        "cache": {
            "disk": {"hostPath": "/var/lib/cachefs/disk", "quota": "1GiB"},
            "memory": {"enabled": True, "type": "emptyDir", "quota": "64MiB"},
        },
        "origins": {"envFromSecret": "s3-credentials"},
        "config": {
            "block_size": "64KiB",
            "policy": [
                {"callers": ["pod"], "allow": ["view"], "sources": [prefix]},
                {"callers": ["namespace:team-a"], "allow": ["read"], "sources": [prefix]},
            ],
        },
        "models": [{"name": "llama", "source": source, "pin": True}],
    }
    objects = render(chart, values)
    # The origin's credentials reach the node only through the rendered envFrom.
    credentials = s3.env()
    for name in credentials:
        monkeypatch.delenv(name, raising=False)
    address = f"127.0.0.1:{_free_port()}"  # the node's gRPC port 7070, on loopback
    host = Host(short_root, objects, {"s3-credentials": credentials}, listen={7070: address})
    daemon_pod = host.pod("daemonset", one(objects, "DaemonSet")["spec"]["template"]["spec"])
    node, plugin = daemon_pod.container("node"), daemon_pod.container("csi")
    registrar = daemon_pod.container("node-driver-registrar")

    # The rendered config, its paths inside the containers as the chart wrote them, is
    # written where the ConfigMap is mounted. Kubernetes membership is covered by
    # tests/test_membership.py and CachedModels by tests/test_models.py: the cluster
    # section is replaced by a static cluster of this one node, which a cluster prefetch
    # needs, and an API stand-in that answers the node's TokenReviews; the model
    # controller is off.
    config = rendered_config(objects)
    for tier in config["tiers"]:
        assert node.path(tier["path"]) == plugin.path(tier["path"])
        tier["path"] = str(node.path(tier["path"]))
    config["csi"]["state_dir"] = str(plugin.path(config["csi"]["state_dir"]))
    assert config["cluster"]["membership"] == "kubernetes"
    config["cluster"] = {
        "membership": "static",
        "peers": [address],
        "kubernetes_api_url": kube_api.url,
    }
    assert config["models"]["enabled"] is True
    config["models"] = {"enabled": False}
    config_file = node.path(node.flag("--config"))
    assert config_file == plugin.path(plugin.flag("--config"))
    config_file.write_text(yaml.safe_dump(config))

    processes.append(CachefsProcess(node.argv(), token=None, env=node.env()))
    serving = processes[-1].wait_ready().serving
    assert serving["address"] == address
    assert serving["socket"] == f"unix://{node.path('/run/cachefs/cachefs.sock')}"
    # kubelet's gRPC probe: the health service on the TCP port, no token.
    with grpc.insecure_channel(serving["address"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://{serving['metrics_address']}/metrics", timeout=10) as r:
        assert b"cachefs_tier_quota_bytes" in r.read()

    # A cluster prefetch by hand (docs/kubernetes.md), through the peers Service, whose
    # name this node's TCP address stands for: the token the node container mounts is
    # the one the node demands.
    expected = _model(s3)
    argv = ["prefetch", "--cluster", "--wait", "--endpoint", serving["address"]]
    done = _run_cli(node, [*argv, "--pin", "--holder", "model:llama", source])
    assert done.returncode == 0, done.stderr
    status = _run_cli(node, ["status", "--json"])  # kubectl exec ... -c node -- cachefs status
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pins"] == {"model:llama": len(expected)}

    processes.append(CachefsProcess(plugin.argv(), token=None, env=plugin.env()))
    processes[-1].wait_ready()

    # Where kubelet will call the plugin: the registration path, a host path.
    registration = next(
        a.split("=", 1)[1]
        for a in registrar.spec["args"]
        if a.startswith("--kubelet-registration-path=")
    )
    socket_path = host.host_path(registration)
    assert socket_path.is_socket()
    assert registrar.value("--csi-address=/csi/csi.sock") == f"--csi-address={socket_path}"
    assert plugin.env()["CSI_ENDPOINT"] == f"unix://{socket_path}"

    target_in_kubelet = "/var/lib/kubelet/pods/0b6c1f6e/volumes/kubernetes.io~csi/model/mount"
    target = plugin.path(target_in_kubelet)
    assert target == host.host_path(target_in_kubelet)  # the same path in the plugin
    target.parent.mkdir(parents=True)
    request = csi.NodePublishVolumeRequest(
        volume_id="csi-7d1b",
        target_path=str(target),
        volume_capability=csi.VolumeCapability(
            mount=csi.VolumeCapability.MountVolume(),
            access_mode=csi.VolumeCapability.AccessMode(
                mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
            ),
        ),
        readonly=True,
        volume_context={
            "source": source,
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.name": "vllm-0",
            "csi.storage.k8s.io/pod.namespace": "serving",
            "csi.storage.k8s.io/pod.uid": "0b6c1f6e",
            "csi.storage.k8s.io/serviceAccount.name": "default",
        },
    )
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = csi_grpc.NodeStub(channel)
        assert stub.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=10).node_id == "node-1"
        stub.NodePublishVolume(request, timeout=60)
        published = {
            str(p.relative_to(target)): p.read_bytes()
            for p in sorted(target.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        assert published == expected
        # The view came from the memory tier: the emptyDir both containers mount.
        memory = daemon_pod.volumes["cache-memory"]
        assert os.stat(target / "config.json").st_ino in {
            p.stat().st_ino for p in memory.rglob("data")
        }

        # The loader example reads the same model through the node's unix socket, as a
        # pod of team-a: with the token it projects, and refused without it.
        loader = [sys.executable, str(EXAMPLES / "loader" / "load.py"), "--framework=numpy"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "AWS_"))}
        env["CACHEFS_ENDPOINT"] = serving["socket"]
        refused = subprocess.run(
            [*loader, source], env=env, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and "may not read" in refused.stderr, refused.stderr
        token_file = short_root / "pod-token"
        token_file.write_text(kube_api.issue_token("team-a", "default"))
        env["CACHEFS_POD_TOKEN_FILE"] = str(token_file)
        loaded = subprocess.run(
            [*loader, source], env=env, capture_output=True, text=True, timeout=60
        )
        assert loaded.returncode == 0, loaded.stderr
        summary = json.loads(loaded.stdout)
        assert summary["tensors"] == 1 and summary["bytes"] == 3 * BLOCK // 4 * 4

        stub.NodeUnpublishVolume(
            csi.NodeUnpublishVolumeRequest(volume_id="csi-7d1b", target_path=str(target)),
            timeout=30,
        )
    assert not target.exists()
    assert str(target) not in mounts_under(short_root)
