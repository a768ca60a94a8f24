"""The wheel users install: one import name, every module under its installed name, and
the Dockerfile's stand-in packages in step with pyproject.toml.

node/ and csi/ install as ``cachefs.node`` and ``cachefs.csi`` through an explicit
package list and a package-dir mapping; a folder added without its entry would be
missing from the wheel (and from the image) while the editable install of the tests
still imports it. The lists are read from pyproject.toml, never repeated here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_INFO = re.compile(r"[^/]+\.(dist-info|data)")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _setuptools() -> tuple[list[str], dict[str, str]]:
    """The package list and the package-dir mapping (package name -> folder)."""
    settings = _pyproject()["tool"]["setuptools"]
    return list(settings["packages"]), dict(settings.get("package-dir", {}))


def _folder(package: str, package_dir: dict[str, str]) -> str:
    """Where ``package``'s sources live: the longest mapped parent's folder, else its dots
    as slashes (setuptools' rule)."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        mapped = package_dir.get(".".join(parts[:cut]))
        if mapped is not None:
            return "/".join([mapped, *parts[cut:]])
    return "/".join(parts)


def _installed(folder: str, package_dir: dict[str, str]) -> str:
    """The installed path of a source folder: ``node/cluster`` -> ``cachefs/node/cluster``."""
    for package, mapped in sorted(package_dir.items(), key=lambda item: -len(item[1])):
        if folder == mapped or folder.startswith(mapped + "/"):
            return package.replace(".", "/") + folder[len(mapped) :]
    return folder


def _source_roots(packages: list[str], package_dir: dict[str, str]) -> list[str]:
    """The top-level source folders the packages come from (cachefs, node, csi)."""
    return sorted({_folder(package, package_dir).split("/")[0] for package in packages})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel pip builds from a copy of the sources (so that no build/ directory of
    an earlier build can add stale modules, and the checkout stays untouched)."""
    packages, package_dir = _setuptools()
    source = tmp_path_factory.mktemp("source")
    shutil.copy2(REPO_ROOT / "pyproject.toml", source)
    shutil.copy2(REPO_ROOT / _pyproject()["project"]["readme"], source)
    for root in _source_roots(packages, package_dir):
        shutil.copytree(
            REPO_ROOT / root, source / root, ignore=shutil.ignore_patterns("__pycache__")
        )
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = dist.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_only_top_level_import_name_is_cachefs(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {name.split("/")[0] for name in names if not DIST_INFO.fullmatch(name.split("/")[0])}
    assert tops == {"cachefs"}, sorted(tops)
    top_level = [name for name in names if re.fullmatch(r"[^/]+\.dist-info/top_level\.txt", name)]
    for name in top_level:
        assert wheel.read(name).decode().split() == ["cachefs"], name


def test_every_module_is_in_the_wheel_under_its_installed_name(wheel: zipfile.ZipFile) -> None:
    packages, package_dir = _setuptools()
    expected = {}
    for root in _source_roots(packages, package_dir):
        for module in sorted((REPO_ROOT / root).rglob("*.py")):
            relative = module.relative_to(REPO_ROOT)
            if "__pycache__" in relative.parts:
                continue
            folder = relative.parent.as_posix()
            expected[relative.as_posix()] = f"{_installed(folder, package_dir)}/{module.name}"
    assert expected, "no modules found: the package-dir mapping was not understood"
    names = set(wheel.namelist())
    missing = {
        source: installed for source, installed in expected.items() if installed not in names
    }
    assert not missing, (
        f"modules missing from the wheel (add their packages to [tool.setuptools] packages "
        f"in pyproject.toml): {missing}"
    )


def _dockerfile_stand_ins() -> list[str]:
    """The folders the build stage's ``for package in ...`` loop creates."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    (build,) = [stage for stage in stages if re.match(r"\S+ AS build\b", stage)]
    (loop,) = re.findall(r"\bfor package in ([^;]*);", build)
    return loop.split()


def test_the_dockerfile_stand_ins_are_the_packages_of_pyproject() -> None:
    packages, package_dir = _setuptools()
    folders = _dockerfile_stand_ins()
    assert len(folders) == len(set(folders)), f"a folder twice in the Dockerfile: {folders}"
    stand_ins = sorted(_installed(folder, package_dir).replace("/", ".") for folder in folders)
    assert stand_ins == sorted(packages), (
        "the Dockerfile's `for package in ...` loop and pyproject.toml's packages differ: "
        f"only in the Dockerfile {sorted(set(stand_ins) - set(packages))}, only in "
        f"pyproject.toml {sorted(set(packages) - set(stand_ins))}"
    )
