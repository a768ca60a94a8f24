"""The committed protobuf modules are what the .proto generates today, and the
contract's types cross the wire through them unchanged."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from cachefs import messages
from cachefs.proto import cachefs_pb2 as pb
from cachefs.proto import generate
from cachefs.types import CachedEntry, JobStatus, ModelInfo, NodeStatus, ObjectInfo, TierStatus


def test_generated_modules_match_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachefs.proto.generate", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_notices_a_drift(tmp_path, monkeypatch) -> None:
    proto = REPO_ROOT / "cachefs" / "proto" / "cachefs.proto"
    copy = tmp_path / "cachefs" / "proto"
    copy.mkdir(parents=True)
    (copy / "cachefs.proto").write_text(
        proto.read_text().replace("message StatRequest {", "message StatRequest {\n  bool x = 9;")
    )
    for suffix in generate.OUTPUTS:
        (copy / f"cachefs{suffix}").write_bytes(
            (REPO_ROOT / "cachefs" / "proto" / f"cachefs{suffix}").read_bytes()
        )
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    monkeypatch.setattr(generate, "PROTOS", ("cachefs/proto/cachefs.proto",))
    assert "cachefs/proto/cachefs_pb2.py" in generate.drifted()


# -- the contract's types on the wire ---------------------------------------------------

WIRE = [  # contract type, its message, type fields the message spells otherwise
    (JobStatus, pb.JobStatus, {}),
    (TierStatus, pb.TierStatus, {}),
    (NodeStatus, pb.StatusResponse, {}),
    (CachedEntry, pb.Entry, {"url": "name"}),
    (ObjectInfo, pb.ObjectInfo, {}),
    (ModelInfo, pb.ModelInfo, {}),
]


@pytest.mark.parametrize(
    ("cls", "message", "renamed"), WIRE, ids=lambda v: getattr(v, "__name__", "")
)
def test_every_field_of_a_contract_type_has_its_message_field(cls, message, renamed) -> None:
    on_the_wire = set(message.DESCRIPTOR.fields_by_name)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.compare and renamed.get(f.name, f.name) not in on_the_wire
    ]
    assert not missing, f"{cls.__name__} fields without a field in {message.__name__}: {missing}"


JOB = JobStatus(
    id="j1",
    state="failed",
    sources=("s3://b/a/", "s3://b/c"),
    pin_holder="job:x",
    bytes_total=10,
    bytes_done=7,
    objects_total=3,
    objects_done=2,
    fetched_bytes=5,
    peer_bytes=2,
    cached_before=1,
    evicted_during=1,
    seconds=1.5,
    error="origin unavailable",
    error_kind="OriginUnavailableError",
    nodes_total=4,
    nodes_done=3,
)


def test_contract_types_cross_the_wire_unchanged() -> None:
    assert messages.job_status(messages.job_message(JOB)) == JOB
    plain = JobStatus(id="j2", state="running", sources=("s3://b/k",))  # None stays None
    assert messages.job_status(messages.job_message(plain)) == plain
    tier = TierStatus("disk", "disk", "/c", 100, 50, 8, 60, 20, 3, 2)
    status = NodeStatus(
        node_id="n",
        tiers=(tier,),
        pins={"job:x": 2},
        jobs=(JOB, plain),
        served_bytes={"local": 3, "origin": 1},
        hits=3,
        misses=1,
        fetched_bytes=9,
        rpcs={"Stat": 4},
        uptime_seconds=2.5,
        members=("a:1", "b:1"),
    )
    assert messages.node_status(messages.status_message(status)) == status
    entry = CachedEntry("s3://b/k", "etag:1", 10, 8, "disk", False, ("job:x",), "id1")
    assert messages.cached_entry(messages.cached_entry_message(entry)) == entry
    info = ObjectInfo("s3://b/k", "etag:1", 10, "id1", True, "/c/data", 42, handle="x")
    assert messages.object_info(messages.object_message(info, 8192), handle="y") == info
