"""The CSI allow-list and its configuration: path boundaries, namespaces, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.csi.allow import AllowRule, check_source
from cachefs.node.config import load_config

RULES = (
    AllowRule.parse("s3://models/"),
    AllowRule.parse("s3://team/llama", ["team-a"]),
    AllowRule.parse("https://huggingface.co/org/"),
)


@pytest.mark.parametrize(
    ("source", "namespace", "canonical"),
    [
        ("s3://models/llama/", None, "s3://models/llama"),
        ("s3://models/llama/model.safetensors", "x", "s3://models/llama/model.safetensors"),
        ("s3://models/", None, "s3://models"),
        ("s3://team/llama/", "team-a", "s3://team/llama"),
        ("s3://team/llama/config.json", "team-a", "s3://team/llama/config.json"),
        (
            "https://huggingface.co/org/m/resolve/main/x",
            None,
            "https://huggingface.co/org/m/resolve/main/x",
        ),
    ],
)
def test_allowed_sources(source: str, namespace: str | None, canonical: str) -> None:
    assert check_source(source, namespace, RULES) == canonical


@pytest.mark.parametrize(
    ("source", "namespace", "error"),
    [
        ("s3://models-private/x", None, PermissionError),
        ("s3://other/models/x", None, PermissionError),
        ("s3://team/llama/", "team-b", PermissionError),
        ("s3://team/llama/", None, PermissionError),
        ("s3://team/llama-secret/x", "team-a", PermissionError),
        ("https://huggingface.co/organisation/x", None, PermissionError),
        ("s3://models/../secret/x", None, ValueError),
        ("", None, ValueError),
        ("nosuchscheme://x/y", None, ValueError),
    ],
)
def test_refused_sources(source: str, namespace: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_source(source, namespace, RULES)


def test_an_empty_allow_list_allows_nothing() -> None:
    with pytest.raises(PermissionError, match="--allow"):
        check_source("s3://models/x", None, ())


def test_the_csi_config_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "csi:\n  allow:\n    - s3://models/\n    - {prefix: s3://team/, namespaces: [a, b]}\n"
        "  publish_timeout: 30\n  state_dir: /var/lib/x\n"
    )
    config = load_config(path, environ={}).csi
    assert [(r.prefix, r.namespaces) for r in config.allow] == [
        ("s3://models/", ()),
        ("s3://team/", ("a", "b")),
    ]
    assert config.publish_timeout == 30.0 and config.state_dir == "/var/lib/x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("csi:\n  publish_timeout: 300\n", "kubelet"),
        ("csi:\n  allow: [{namespaces: [a]}]\n", "prefix"),
        ("csi:\n  allow: [{prefix: s3://x/, namespace: a}]\n", "namespace"),
        ("csi:\n  alow: []\n", "csi.alow"),
    ],
)
def test_bad_csi_config_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path, environ={})


def test_the_plugin_needs_the_node_name(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    result = subprocess.run(
        [sys.executable, "-m", "cachefs.cli", "csi", "--csi-endpoint", f"unix://{tmp_path}/c.sock"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1 and "NODE_NAME" in result.stderr
