"""The layers import downwards only: flows -> tasks -> storage -> core; nothing in them imports demo/, and no
stage or flow spells a file name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each layer may import from the project; demo/ may use every layer.
ALLOWED = {
    "core": {"core"},
    "storage": {"core", "storage"},
    "tasks": {"core", "storage", "tasks"},
    "flows": {"core", "storage", "tasks", "flows"},
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


def test_the_demo_commands_reach_the_command_line_as_a_plugin(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert {"demo", "make-archives"} <= set(capsys.readouterr().out.split())


# A name of a file or folder inside the data root, or of a file format the project writes: such names live in
# storage/ (README, "Architecture"); stages and flows ask storage for paths.
FILE_NAME = re.compile(r"^[\w.\-{}:]*\.(json|npy|npz|parquet|keras|h5|part|lock|md|png|csv|gz|tgz|tar|pkl)$|_manifest")


# The one exception: the iris table ships as package data of tasks/ (tasks/data/), outside every data root.
SHIPPED = {"iris.csv"}


def file_name_literals(path: Path) -> list[str]:
    """String constants of a module that name a file (docstrings and f-string text left out of it)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        and FILE_NAME.search(node.value.strip()) and node.value not in SHIPPED
    ]


@pytest.mark.parametrize("layer", ["tasks", "flows"])
def test_stages_and_flows_spell_no_file_name(layer):
    found = {str(path.relative_to(ROOT)): names for path in sorted((ROOT / layer).rglob("*.py"))
             if (names := file_name_literals(path))}
    assert found == {}
