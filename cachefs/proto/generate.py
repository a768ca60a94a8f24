"""Regenerate the protobuf modules: ``python -m cachefs.proto.generate`` from the repo root.

``--check`` regenerates into a temporary directory and exits 1 when the committed
modules differ (the drift test runs it). grpcio-tools is pinned in the test extra:
another release generates other text.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("cachefs/proto/cachefs.proto", "csi/proto/csi.proto")
OUTPUTS = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    for proto in PROTOS:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                "-I",
                str(ROOT),
                # The well-known types grpcio-tools ships (google/protobuf/wrappers.proto).
                "-I",
                str(Path(protoc.__file__).parent / "_proto"),
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(ROOT / proto),
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed on {proto}")


def drifted() -> list[str]:
    """The generated files that differ from what the .proto files generate now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        changed = []
        for proto in PROTOS:
            stem = proto.removesuffix(".proto")
            for suffix in OUTPUTS:
                fresh, committed = Path(tmp) / (stem + suffix), ROOT / (stem + suffix)
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    changed.append(str(committed.relative_to(ROOT)))
        return changed


def main() -> int:
    if "--check" in sys.argv[1:]:
        changed = drifted()
        for name in changed:
            print(f"{name} differs from its .proto: run python -m cachefs.proto.generate")
        return 1 if changed else 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
