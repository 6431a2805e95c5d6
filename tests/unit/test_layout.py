"""The house's layering: the pure core imports nothing above it (drivers, controller, faces)."""

from __future__ import annotations

import ast
from pathlib import Path

import podfsm

_PACKAGE = Path(podfsm.__file__).parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_core_imports_only_core() -> None:
    above = ("podfsm.drivers", "podfsm.controller", "podfsm.faces", "podfsm.engine")
    bad = {
        f"{path.name}: {mod}"
        for path in sorted((_PACKAGE / "core").glob("*.py"))
        for mod in _imports(path)
        if mod.startswith(above)
    }
    assert not bad, f"podfsm.core imports from above it: {sorted(bad)}"
