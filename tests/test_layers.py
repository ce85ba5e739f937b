"""The layers import downwards only: flows -> tasks -> storage -> core, and nothing in them imports demo/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each layer may import from the project; demo/ may use every layer.
ALLOWED = {
    "core": {"core"},
    "storage": {"core", "storage"},
    "tasks": {"core", "storage", "tasks"},
    "flows": {"core", "storage", "tasks", "flows", "demo"},
}
PROJECT = {"core", "storage", "tasks", "flows", "demo"}


def project_imports(path: Path) -> set[str]:
    """The project packages a module imports, anywhere in it (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & PROJECT


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = {
        str(path.relative_to(ROOT)): sorted(project_imports(path) - ALLOWED[layer])
        for path in sorted((ROOT / layer).rglob("*.py"))
    }
    assert {name: imports for name, imports in wrong.items() if imports} == {}


def test_only_the_command_line_reaches_the_demo():
    users = [path.name for path in (ROOT / "flows").glob("*.py") if "demo" in project_imports(path)]
    assert users == ["cli.py"]
