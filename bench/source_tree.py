"""Run cachefs from a given source tree, whatever is installed: before/after in one run.

Every cachefs process a benchmark starts for a compared tree goes through ``BOOT``, so
that ``cachefs`` and the folders the project installs as ``cachefs.node`` and
``cachefs.csi`` are imported from the tree named first:
``python -c BOOT TREE -m MODULE ARGS`` or ``python -c BOOT TREE -c CODE ARGS``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BOOT = """
import importlib.util, os, runpy, sys
tree = sys.argv[1]
folders = {"cachefs": "cachefs", "cachefs.node": "node", "cachefs.csi": "csi"}

class SourceTree:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in folders:
            return None
        where = os.path.join(tree, folders[name])
        return importlib.util.spec_from_file_location(
            name, os.path.join(where, "__init__.py"), submodule_search_locations=[where])

sys.meta_path.insert(0, SourceTree)
kind, what = sys.argv[2], sys.argv[3]
if kind == "-m":
    sys.argv = [what, *sys.argv[4:]]
    runpy.run_module(what, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *sys.argv[4:]]
    exec(compile(what, "<bench>", "exec"), {"__name__": "__main__"})
"""


def cachefs_argv(tree: Path, kind: str, what: str, *args: str) -> list[str]:
    """``python`` running ``-m MODULE`` or ``-c CODE`` with cachefs from ``tree``."""
    return [sys.executable, "-c", BOOT, str(tree), kind, what, *args]


def source_tree(text: str) -> Path:
    """An argparse type: a directory holding a cachefs source tree."""
    tree = Path(text).resolve()
    for folder in ("cachefs", "node"):
        if not (tree / folder / "__init__.py").exists():
            raise argparse.ArgumentTypeError(
                f"{text}: not a cachefs source tree (no {folder}/__init__.py)"
            )
    return tree
