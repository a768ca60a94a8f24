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
# Each .proto by the name it is imported as (so generated imports are absolute and
# under cachefs), and the repository folder that holds that package.
PROTOS = ("cachefs/proto/cachefs.proto", "cachefs/csi/proto/csi.proto")
FOLDERS = {"cachefs/csi/": "csi/", "cachefs/": "cachefs/"}
OUTPUTS = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def repository_path(import_path: str) -> str:
    """Where a file of the ``cachefs`` package lives in the repository."""
    for package, folder in FOLDERS.items():
        if import_path.startswith(package):
            return folder + import_path[len(package) :]
    raise ValueError(f"{import_path} is not in the cachefs package")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    for proto in PROTOS:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                # Import names to folders: cachefs/csi/ is the folder csi/.
                *(
                    f"-I{package.rstrip('/')}={ROOT / folder}"
                    for package, folder in FOLDERS.items()
                ),
                # The well-known types grpcio-tools ships (google/protobuf/wrappers.proto).
                "-I",
                str(Path(protoc.__file__).parent / "_proto"),
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                proto,
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed on {proto}")


def generated_pairs(out_dir: Path) -> list[tuple[Path, Path]]:
    """(freshly generated file under ``out_dir``, its committed counterpart) pairs."""
    pairs = []
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        for suffix in OUTPUTS:
            pairs.append((out_dir / (stem + suffix), ROOT / repository_path(stem + suffix)))
    return pairs


def drifted() -> list[str]:
    """The generated files that differ from what the .proto files generate now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            str(committed.relative_to(ROOT))
            for fresh, committed in generated_pairs(Path(tmp))
            if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False)
        ]


def main() -> int:
    if "--check" in sys.argv[1:]:
        changed = drifted()
        for name in changed:
            print(f"{name} differs from its .proto: run python -m cachefs.proto.generate")
        return 1 if changed else 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for fresh, committed in generated_pairs(Path(tmp)):
            committed.write_bytes(fresh.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
