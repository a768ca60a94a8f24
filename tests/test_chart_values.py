"""Chart values that pass the values schema must not crash pods.

Each bad value is refused twice: by what the pods meet (the API server's checks of the
DaemonSet, the node's reading of its config file, its start-up checks), given what the
chart renders once its schema is taken away; and by the chart itself, at install and
lint. Good values pass the same checks, and the schema reads sizes as cachefs does.
"""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
from test_chart import CASES, CHART, KUBE_VERSION, NAMESPACE, one, render

from cachefs.cli import _check_socket_group
from cachefs.node.config import _RETRY_LOWS, Config, load_config
from cachefs.node.store.index import resolve_group
from cachefs.units import parse_size

NO_GROUP = "cachefs-no-such-group"  # a group name no host or image has


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def unchecked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[helm_python.Chart]:
    """The chart without its schema: what its templates alone would hand the pods."""
    copy = tmp_path_factory.mktemp("chart") / "cachefs"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with helm_python.Chart.load(copy) as loaded:
        yield loaded


# A Kubernetes quantity in the forms the chart writes (the API server refuses others).
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_QUANTITY_UNITS = {
    None: 1,
    **{unit: 1000 ** (i + 1) for i, unit in enumerate(("k", "M", "G", "T", "P", "E"))},
    **{unit: 1024 ** (i + 1) for i, unit in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}


def quantity_bytes(text: str) -> int:
    """Bytes of a quantity, computed as ``parse_size`` computes a size, so they compare."""
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"emptyDir sizeLimit {text!r} is not a Kubernetes quantity")
    return int(float(match[1]) * _QUANTITY_UNITS[match[2]])


def start_pod(objects: list[dict], tmp_path: Path) -> Config:
    """What an install meets before its node serves: the API server's checks of the
    DaemonSet, the node's (and the CSI plugin's) reading of the config file, and the
    node's start-up checks; raises where a pod would never run."""
    daemonset = one(objects, "DaemonSet")
    kubernetes_validate.validate(daemonset, KUBE_VERSION, strict=True)
    for volume in daemonset["spec"]["template"]["spec"]["volumes"]:
        if "sizeLimit" in volume.get("emptyDir", {}):
            quantity_bytes(volume["emptyDir"]["sizeLimit"])
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["config.yaml"])
    config = load_config(path, environ={})
    _check_socket_group(config.server.socket_group)  # `cachefs node`, before it listens
    if config.group:
        resolve_group(config.group)  # the store, before it opens the tiers
    for tier in config.tiers:
        if tier.medium == "memory" and tier.quota is None:
            # The node would size it at 90% of the tmpfs's free space: the node's RAM,
            # far past the container's memory limit, so the first big model OOM-kills it.
            raise ValueError(f"memory tier {tier.name!r} has no quota")
    return config


# values, where the schema finds the fault, what the pod's check says
BAD_VALUES: dict[str, tuple[dict[str, Any], str, str]] = {
    "block size in decimal megabytes": (
        {"config": {"block_size": "8 MB"}},
        "/config/block_size",
        "block_size must be a multiple of 4 KiB",
    ),
    "block size in bytes, not a multiple of 4 KiB": (
        {"config": {"block_size": 5000}},
        "/config/block_size",
        "block_size must be a multiple of 4 KiB",
    ),
    "block size in KiB, not a multiple of 4": (
        {"config": {"block_size": "6KiB"}},
        "/config/block_size",
        "block_size must be a multiple of 4 KiB",
    ),
    "block size below 4 KiB": (
        {"config": {"block_size": "2KiB"}},
        "/config/block_size",
        "block_size must be a multiple of 4 KiB",
    ),
    "block size in a fraction of a MiB": (
        {"config": {"block_size": "1.3MiB"}},
        "/config/block_size",
        "block_size must be a multiple of 4 KiB",
    ),
    "csi.allow, now a policy rule": (
        {"config": {"csi": {"allow": ["models/"]}}},
        "/config/csi",
        "csi.allow is now part of the policy",
    ),
    "policy source without a protocol": (
        {"config": {"policy": [{"callers": ["pod"], "allow": ["view"], "sources": ["models/"]}]}},
        "/config/policy/0/sources/0",
        "malformed URL",
    ),
    "memory emptyDir without a quota": (
        {"cache": {"memory": {"enabled": True, "type": "emptyDir", "quota": None}}},
        "/cache/memory",
        "is not a Kubernetes quantity",
    ),
    "memory hostPath without a quota": (
        {"cache": {"memory": {"enabled": True, "type": "hostPath", "quota": None}}},
        "/cache/memory",
        "memory tier 'memory' has no quota",
    ),
    "memory hostPath without its path": (
        {"cache": {"memory": {"enabled": True, "hostPath": None}}},
        "/cache/memory",
        "None is not of type 'string'",
    ),
    "retry timeout under a millisecond": (
        {"config": {"retry": {"timeout": 0.0005}}},
        "/config/retry/timeout",
        "retry.timeout must be at least 0.001",
    ),
    "retry min_rate not whole": (
        {"config": {"retry": {"min_rate": 1.5}}},
        "/config/retry/min_rate",
        "retry.min_rate must be a whole number",
    ),
    "retry breaker_failures negative": (
        {"config": {"retry": {"breaker_failures": -1}}},
        "/config/retry/breaker_failures",
        "retry.breaker_failures must be at least 0",
    ),
    "origin_connections past 4096": (
        {"config": {"origin_connections": 5000}},
        "/config/origin_connections",
        "origin_connections must be between 1 and 4096",
    ),
    "cache group by name": (
        {"config": {"group": NO_GROUP}},
        "/config/group",
        f"group '{NO_GROUP}' does not exist",
    ),
    "socket group by name": (
        {"config": {"server": {"socket_group": NO_GROUP}}},
        "/config/server/socket_group",
        f"server.socket_group '{NO_GROUP}' is not a group",
    ),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_values_a_pod_refuses_the_chart_refuses(chart, unchecked, case: str, tmp_path) -> None:
    values, where, message = BAD_VALUES[case]
    with pytest.raises((ValueError, kubernetes_validate.ValidationError), match=re.escape(message)):
        start_pod(render(unchecked, values), tmp_path)
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(chart, values)
    assert f"at '{where}'" in str(refused.value)
    report = helm_python.lint(CHART, values, namespace=NAMESPACE)
    assert any(f"at '{where}'" in error for error in report["errors"])


EDGE_VALUES: dict[str, dict[str, Any]] = {  # good values at the schema's edges
    "smallest block size": {"config": {"block_size": "4KiB"}},
    "block size in KiB": {"config": {"block_size": "100KiB"}},
    "block size spaced and in lower case": {"config": {"block_size": " 16 mib "}},
    "block size in bytes": {"config": {"block_size": 8 * 1024 * 1024 + 4096}},
    "block size in GiB": {"config": {"block_size": "1GiB"}},
    "memory emptyDir in a fraction of a GiB": {
        "cache": {"memory": {"enabled": True, "type": "emptyDir", "quota": "1.5GiB"}}
    },
    "memory emptyDir spaced": {
        "cache": {"memory": {"enabled": True, "type": "emptyDir", "quota": " 8 gib "}}
    },
    "memory hostPath of zero bytes": {"cache": {"memory": {"enabled": True, "quota": "0"}}},
    "memory disabled without a quota": {"cache": {"memory": {"enabled": False, "quota": None}}},
    "retry at its lows": {"config": {"retry": dict(_RETRY_LOWS)}},
    "fewest origin connections": {"config": {"origin_connections": 1}},
    "most origin connections": {"config": {"origin_connections": 4096}},
    "policy sources of every kind": {
        "config": {
            "policy": [
                {"callers": ["pod"], "allow": ["view"], "sources": ["*"]},
                {
                    "callers": ["namespace:team-a", "uid:1000"],
                    "allow": ["read", "prefetch"],
                    "sources": ["s3://models/", "file:///srv/models/", "HTTPS://Example.com/m/"],
                },
            ]
        }
    },
    "groups as numbers": {"config": {"group": 2000, "server": {"socket_group": "0"}}},
}
GOOD_VALUES = {**CASES, **EDGE_VALUES}


@pytest.mark.parametrize("case", GOOD_VALUES)
def test_values_the_chart_accepts_start_a_pod(chart, case: str, tmp_path) -> None:
    objects = render(chart, GOOD_VALUES[case])
    start_pod(objects, tmp_path)
    for obj in objects:
        # The Prometheus Operator's kind, and the chart's own (tests/test_crd.py checks it).
        if not obj["apiVersion"].startswith(("monitoring.coreos.com/", "cachefs.io/")):
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("quota", ["8GiB", " 8 gib ", "1.5GiB", "512 M", "1000000", "16\tKiB"])
def test_a_memory_volume_holds_exactly_its_tier(chart, quota: str, tmp_path) -> None:
    memory = {"enabled": True, "type": "emptyDir", "quota": quota}
    objects = render(chart, {"cache": {"memory": memory}})
    config = start_pod(objects, tmp_path)
    volumes = one(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    limit = next(v for v in volumes if v["name"] == "cache-memory")["emptyDir"]["sizeLimit"]
    assert quantity_bytes(limit) == config.tiers[0].quota == parse_size(quota)


def _schema_accepts(chart: helm_python.Chart, values: dict[str, Any]) -> bool:
    try:
        chart.validate_schema(chart.merge_values(values))
    except helm_python.HelmValuesError:
        return False
    return True


def _program_accepts(read: Callable[[Any], object], value: Any) -> bool:
    try:
        read(value)
    except ValueError:
        return False
    return True


NUMBERS = ["0", "1", "8", "007", "1.5", "10.25", ".5", "5.", "1e3", "-1", "", "0x10"]
UNITS = ["", "b", "B", "k", "K", "kb", "KB", "Ki", "KiB", "kib", "KIB", "m", "M", "MB", "Mi"]
UNITS += ["MiB", "mIb", "g", "GB", "Gi", "GiB", "t", "TB", "TiB", "i", "ib", "bytes", "PiB"]
UNITS += ["P", "x", "MiBs", "Mb"]
SPACES = [("", "", ""), ("", " ", ""), (" ", "", " "), ("\t", "\t", "\t"), ("", "  ", "\n")]


def test_the_schema_reads_a_size_as_cachefs_does(chart) -> None:
    spellings = [number + unit for number, unit in itertools.product(NUMBERS, UNITS)]
    spellings += [
        f"{lead}{number}{middle}{unit}{trail}"
        for number, unit, (lead, middle, trail) in itertools.product(
            ["8", "1.5"], ["", "MiB", "kb", "G", "x"], SPACES
        )
    ]
    differ = [
        (size, schema)
        for size in spellings
        if (schema := _schema_accepts(chart, {"cache": {"disk": {"quota": size}}}))
        != _program_accepts(parse_size, size)
    ]
    assert differ == []
    assert _schema_accepts(chart, {"cache": {"disk": {"quota": "8MiB"}}})  # the grid has both
    assert not _schema_accepts(chart, {"cache": {"disk": {"quota": "8MiBs"}}})


BINARY = {"ki", "kib", "mi", "mib", "gi", "gib", "ti", "tib"}


def test_every_block_size_the_schema_accepts_the_node_accepts(chart) -> None:
    """Exact for bytes and whole binary units; decimal units and fractions, which only
    sometimes land on 4 KiB, the schema refuses even where the node would not."""
    numbers = ["0", "1", "2", "3", "4", "6", "8", "12", "16", "20", "64", "100", "1000"]
    numbers += ["1024", "4096", "004", "0.5", "1.5"]
    units = ["", "b", "KiB", "kib", "Ki", "kB", "k", "MiB", "mi", "MB", "M", "GiB", "GB"]
    units += ["G", "TiB", "TB"]
    sizes: list[int | str] = [f"{n}{u}" for n, u in itertools.product(numbers, units)]
    sizes += [f" {n} {u} " for n, u in itertools.product(["4", "6", "8"], ["KiB", "mib"])]
    sizes += [0, 1, 4095, 4096, 5000, 8192, 2**23, 2**23 + 1, 2**23 + 4096]

    def node_reads(size: int | str) -> None:
        load_config(overrides={"block_size": size}, environ={})

    schema_only, node_only = [], []
    for size in sizes:
        schema = _schema_accepts(chart, {"config": {"block_size": size}})
        node = _program_accepts(node_reads, size)
        if schema and not node:
            schema_only.append(size)
        elif node and not schema:
            node_only.append(size)
    assert schema_only == []
    exact = [
        s
        for s in node_only
        if isinstance(s, int) or ("." not in s and re.sub(r"[\d\s]", "", s).lower() in BINARY)
    ]
    assert exact == []
    assert "2MB" not in node_only and "64MB" in node_only  # 64 MB is 15625 pages of 4 KiB
