"""The policy table: callers, operations, source prefixes at path boundaries, holder
names, the config's ``policy`` key and its bad input; and the CSI plugin's own start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.node.callers import IN_PROCESS, Caller
from cachefs.node.config import load_config
from cachefs.node.policy import Policy, Rule

TEAM_A = Caller("pod", namespace="team-a", service_account="loader")
TEAM_B = Caller("pod", namespace="team-b", service_account="default")
ALICE = Caller("local", uid=1000, gid=1000, pid=42)
ROOT = Caller("local", uid=0, gid=0, pid=1)
CLUSTER = Caller("cluster")

POLICY = Policy(
    [
        Rule.parse(["cluster", "uid:0"], ["all"], ["*"]),
        Rule.parse(["pod"], ["view", "read"], ["s3://models/", "https://huggingface.co/org/"]),
        Rule.parse(["namespace:team-a"], ["prefetch", "view", "read"], ["s3://team/llama"]),
        Rule.parse(["uid:1000"], ["read", "prefetch"], ["s3://models/public/"]),
    ]
)


@pytest.mark.parametrize(
    ("caller", "operation", "source", "canonical"),
    [
        (TEAM_B, "view", "s3://models/llama/", "s3://models/llama/"),
        (TEAM_B, "read", "s3://models/llama/model.safetensors", "s3://models/llama/model.safetensors"),
        (TEAM_B, "view", "s3://models/", "s3://models/"),
        (TEAM_A, "prefetch", "s3://team/llama/", "s3://team/llama/"),
        (TEAM_A, "view", "s3://team/llama/config.json", "s3://team/llama/config.json"),
        (TEAM_B, "view", "https://huggingface.co/org/m/resolve/main/x", "https://huggingface.co/org/m/resolve/main/x"),
        (ALICE, "prefetch", "s3://models/public/x.bin", "s3://models/public/x.bin"),
        (ROOT, "manage", "gs://anything/at/all", "gs://anything/at/all"),
        (CLUSTER, "peer", "s3://x/y", "s3://x/y"),
        (IN_PROCESS, "manage", "file:///etc/hosts", "file:///etc/hosts"),
    ],
)  # fmt: skip
def test_allowed(caller: Caller, operation: str, source: str, canonical: str) -> None:
    assert POLICY.require(caller, operation, source) == canonical


@pytest.mark.parametrize(
    ("caller", "operation", "source"),
    [
        (TEAM_B, "view", "s3://models-private/x"),  # a prefix ends at a path boundary
        (TEAM_B, "view", "s3://other/models/x"),
        (TEAM_B, "prefetch", "s3://models/llama/"),  # pods may only view and read there
        (TEAM_B, "view", "s3://team/llama/"),  # team-a's
        (TEAM_A, "view", "s3://team/llama-secret/x"),
        (TEAM_B, "view", "https://huggingface.co/organisation/x"),
        (ALICE, "prefetch", "s3://models/private/x"),
        (ALICE, "manage", "s3://models/public/x"),
        (TEAM_A, "peer", "s3://team/llama/x"),
        (Caller("local", uid=1001, gid=1000, pid=3), "read", "s3://models/public/x"),
    ],
)
def test_refused(caller: Caller, operation: str, source: str) -> None:
    with pytest.raises(PermissionError) as refused:
        POLICY.require(caller, operation, source)
    message = str(refused.value)
    # It names the caller, the source and the rule that would allow it.
    assert str(caller) in message and f"may not {operation}" in message
    assert f"callers: [{caller.principal}], allow: [{operation}]" in message


def test_a_bad_source_is_a_value_error_before_the_policy() -> None:
    for source in ("s3://models/../secret/x", "", "nosuchscheme://x/y"):
        with pytest.raises(ValueError):
            POLICY.require(TEAM_B, "view", source)


def test_the_default_policy_trusts_the_socket_and_the_cluster_token_only() -> None:
    default = Policy()
    assert default.allows(ALICE, "manage", "s3://x/y")
    assert default.allows(CLUSTER, "peer", "s3://x/y")
    assert not default.allows(TEAM_A, "read", "s3://x/y")


def test_holders_are_the_callers_own_unless_it_manages_everything() -> None:
    assert POLICY.holder(ROOT, "csi:vol-1") == "csi:vol-1"
    assert POLICY.holder(ALICE, "user:alice") == "uid:1000/user:alice"
    assert POLICY.holder(TEAM_A, "job:x") == "serviceaccount:team-a/loader/job:x"
    assert POLICY.owns(ALICE, "uid:1000/user:alice")
    assert not POLICY.owns(ALICE, "uid:10000/user:mallory")  # a prefix, but not its own
    assert not POLICY.owns(ALICE, "csi:vol-1")
    assert POLICY.owns(ROOT, "csi:vol-1")
    with pytest.raises(ValueError, match="holder"):
        POLICY.holder(ALICE, "")


def test_the_policy_config_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "policy:\n"
        "  - {callers: [cluster], allow: [all]}\n"
        "  - {callers: [namespace:a, 'serviceaccount:b/loader'], allow: [view], "
        "sources: [s3://models/]}\n"
        "csi:\n  publish_timeout: 30\n  state_dir: /var/lib/x\n"
    )
    config = load_config(path, environ={})
    assert config.policy.allows(
        Caller("pod", namespace="a", service_account="x"), "view", "s3://models/m"
    )
    assert not config.policy.allows(ALICE, "read", "s3://models/m")  # a policy replaces the default
    assert config.csi.publish_timeout == 30.0 and config.csi.state_dir == "/var/lib/x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("csi:\n  publish_timeout: 300\n", "kubelet"),
        ("csi:\n  allow: [s3://x/]\n", "part of the policy"),
        ("csi:\n  alow: []\n", "csi.alow"),
        ("policy: {callers: [cluster]}\n", "list of rules"),
        ("policy:\n  - {callers: [cluster]}\n", "needs callers and allow"),
        ("policy:\n  - {callers: [], allow: [read]}\n", "at least one caller"),
        ("policy:\n  - {callers: [root], allow: [read]}\n", "not a caller pattern"),
        ("policy:\n  - {callers: ['uid:alice'], allow: [read]}\n", "takes a number"),
        ("policy:\n  - {callers: ['namespace'], allow: [read]}\n", "needs a value"),
        ("policy:\n  - {callers: ['serviceaccount:x'], allow: [read]}\n", "NAMESPACE/NAME"),
        ("policy:\n  - {callers: [pod], allow: [write]}\n", "not one of"),
        (
            "policy:\n  - {callers: [pod], allow: [read], sources: ['s3://a/../b']}\n",
            r"policy\[0\]",
        ),
        ("policy:\n  - {callers: [pod], allow: [read], prefix: s3://a/}\n", "unknown keys"),
    ],
)
def test_bad_policy_and_csi_config_is_refused(tmp_path: Path, text: str, message: str) -> None:
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
