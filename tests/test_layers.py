"""The package's layers point one way, and no module imports itself back.

Every import statement of every module counts (at the top, inside functions, under
``TYPE_CHECKING``), read from the source with ``ast``. The layers, bottom up, as
docs/architecture.md draws them:

    contract  cachefs: errors, types, messages, urls, units, ranges, auth,
              rpc_errors, proto
    client    cachefs.client (gRPC to a node)
    node      cachefs.node (engine, store, origins, cluster, service, server,
              embedded mode)
    csi       cachefs.csi (a client of the node)
    front     cachefs.connect, cachefs.filesystem, cachefs.loaders, cachefs.progress
              (what user code imports: they load the node only for embedded mode)
    cli       cachefs.cli

A module may import its own layer or those below it; no cycle anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The folders of the repository and the packages they install as.
FOLDERS = {"cachefs": "cachefs", "node": "cachefs.node", "csi": "cachefs.csi"}
LAYERS = ("contract", "client", "node", "csi", "front", "cli")
PLACES = {  # module (or package) name -> layer; the longest name that matches wins
    "cachefs": "contract",
    "cachefs.client": "client",
    "cachefs.node": "node",
    "cachefs.csi": "csi",
    "cachefs.connect": "front",
    "cachefs.filesystem": "front",
    "cachefs.loaders": "front",
    "cachefs.progress": "front",
    "cachefs.cli": "cli",
}


def _modules() -> dict[str, Path]:
    """Every module of the package by its import name (a package by its own)."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _layer(module: str) -> str:
    parts = module.split(".")
    for length in range(len(parts), 0, -1):
        place = PLACES.get(".".join(parts[:length]))
        if place is not None:
            return place
    raise AssertionError(f"{module} is in no layer: add it to PLACES and to the docs")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``path`` imports by name.

    ``from a.b import c`` imports ``a.b.c`` when that is a module, else ``a.b``. The
    parent packages Python initialises on the way are left out: a package that
    imports its own modules is not a cycle.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if name in modules:
                    found.add(name)
                elif node.module in modules:
                    found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(path, modules) - {name}
        for name, path in modules.items()
        # The generated protobuf modules import each other and nothing of ours.
        if not name.endswith(("_pb2", "_pb2_grpc"))
    }


def test_every_import_points_down_or_across() -> None:
    upward = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module))
    ]
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The walk sees a lazy import inside a function (the kind that hid the old cycle)."""
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from cachefs.node.engine import Engine\n")
    modules = {**_modules(), "cachefs.lazy": module}
    assert "cachefs.node.engine" in _imports(module, modules)
    assert LAYERS.index(_layer("cachefs.node.engine")) > LAYERS.index(_layer("cachefs.types"))


@pytest.mark.parametrize(
    "imported",
    ["cachefs", "cachefs.client", "cachefs.filesystem", "cachefs.loaders", "cachefs.connect"],
)
def test_importing_the_client_side_loads_no_node_module(imported: str) -> None:
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({imported!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('cachefs.node', 'cachefs.csi'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_csi_plugin_does_not_load_the_engine() -> None:
    """The plugin is a client of the node: checking a volume's names and policy loads
    none of the engine, its store or its origins."""
    code = (
        "import sys\n"
        "import cachefs.csi.plugin, cachefs.csi.node\n"
        "print(sorted(m for m in sys.modules if m.startswith(('cachefs.node.engine', "
        "'cachefs.node.store', 'cachefs.node.origins', 'cachefs.node.models.spec'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
