"""The committed protobuf modules are what the .proto generates today."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

from cachefs.proto import generate


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
