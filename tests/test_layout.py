"""The house: folders are layers, imports only go down, no import circles (issue 20).

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and every import counts, those
inside functions and under ``TYPE_CHECKING`` included. Our own modules are imported at module
level only; an import inside a function is kept only for an optional heavy third-party
dependency, with a ``# local:`` comment saying why.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xca_gateway"


def test_layers_kept_and_no_import_circles() -> None:
    # This checkout's package, whatever is installed in the environment.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_imports_of_the_package_under_type_checking() -> None:
    # An import only a type checker sees is still an edge of the import graph: a circle
    # or an upward import hidden from the layers contract.
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (
                        inner.level or (inner.module or "").startswith("xca_gateway")
                    ):
                        hidden.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert hidden == []


def _own_imports_below_module_level(path: Path, own: set[str]) -> list[int]:
    """Lines of imports of ``own`` modules (or relative ones) not at the module's top level."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    lines = []
    for node in ast.walk(tree):
        if id(node) in top:
            continue
        if isinstance(node, ast.ImportFrom):
            deferred = node.level > 0 or (node.module or "").split(".")[0] in own
        elif isinstance(node, ast.Import):
            deferred = any(alias.name.split(".")[0] in own for alias in node.names)
        else:
            continue
        if deferred:
            lines.append(node.lineno)
    return lines


def test_own_modules_are_imported_at_module_level() -> None:
    # A deferred import hides an edge of the import graph (a circle, or an upward import)
    # until the function runs. Only third-party dependencies may load late (``# local:``).
    benchmarks = ROOT / "benchmarks"
    own = {"xca_gateway", "tests", "benchmarks", "reliability"}
    own |= {path.stem for path in benchmarks.glob("*.py")}  # the scripts import each other
    deferred = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("xca_gateway", "tests", "benchmarks", "reliability")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in _own_imports_below_module_level(path, own)
    ]
    assert deferred == []
