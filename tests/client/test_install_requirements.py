"""The dependency lists agree: pyproject.toml (what the registry and pip read) and requirements.txt (what
install.py and ComfyUI-Manager install), and requirements.txt covers everything the client imports."""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from zimage_testing.helpers import REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on; the runtimes' interpreters have it


def requirement_lines(path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_file(path) -> set[str]:
    return {normalized(line) for line in requirement_lines(path)}


def normalized(text: str) -> str:
    req = Requirement(text)
    return f"{canonicalize_name(req.name)}{req.specifier}{f'; {req.marker}' if req.marker else ''}"


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_dependencies_are_requirements_txt():
    deps = {normalized(d) for d in pyproject()["project"]["dependencies"]}
    assert deps == requirement_file(REPO_ROOT / "requirements.txt")


@pytest.mark.parametrize(("extra", "file"), [("dev", "requirements-dev.txt"), ("serve", "requirements-serve.txt")])
def test_pyproject_extras_are_their_requirement_files(extra, file):
    listed = {normalized(d) for d in pyproject()["project"]["optional-dependencies"][extra]}
    assert listed == requirement_file(REPO_ROOT / file)


def module_level_imports(path) -> set[str]:
    """Top-level module names imported at module level (imports inside functions load only when called)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_requirements_txt_covers_every_third_party_import_of_the_client(install):
    """So an install into an existing ComfyUI (requirements.txt only) gives a client that starts."""
    imported = set().union(*(module_level_imports(p) for p in (REPO_ROOT / "zimage_client").glob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "zimage_client"}
    required = {canonicalize_name(Requirement(line).name) for line in requirement_lines(REPO_ROOT / "requirements.txt")}
    distributions = importlib.metadata.packages_distributions()
    for module in third_party:
        assert {canonicalize_name(d) for d in distributions.get(module, [])} & required, \
            f"zimage_client imports {module}, which requirements.txt does not install"

    assert set(install.CLIENT_IMPORTS) == third_party  # what install.py checks before `run` inside a ComfyUI
