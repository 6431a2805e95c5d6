"""The house's layering: the pure core imports nothing above it, the drivers nothing of the
orchestrator or the faces, and the controller reaches the system only through its drivers."""

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


def _package_imports(floor: str) -> dict[str, set[str]]:
    return {path.name: _imports(path) for path in sorted((_PACKAGE / floor).rglob("*.py"))}


def test_drivers_import_nothing_above_them_and_the_controller_no_face() -> None:
    bad = {f"drivers/{name}: {mod}"
           for name, mods in _package_imports("drivers").items() for mod in mods
           if mod.startswith(("podfsm.controller", "podfsm.faces", "podfsm.tools",
                              "podfsm.engine"))}
    bad |= {f"controller/{name}: {mod}"
            for name, mods in _package_imports("controller").items() for mod in mods
            if mod.startswith(("podfsm.faces", "podfsm.tools"))}
    assert not bad, f"imports from above: {sorted(bad)}"


#: What the controller may use of `os`: path arithmetic and its own environment, no system call.
_OS_PURE = {"os.path.join", "os.path.isabs", "os.path.basename", "os.path.dirname", "os.environ"}
#: The `crash` failpoint SIGKILLs the controller's own process, as a crash would: that is its
#: point, and it changes nothing on the system a driver would own.
_OS_JUSTIFIED = {("base.py", "os.kill"), ("base.py", "os.getpid")}
#: Modules that are system I/O whatever is called from them.
_SYSTEM_MODULES = ("shutil", "fcntl", "subprocess", "socket", "ctypes", "pathlib",
                   "aiofiles", "podfsm.drivers.linux")
#: The driver modules the controller may name: the Protocols and the factory that builds the
#: real drivers.
_DRIVER_MODULES = {"podfsm.drivers.base", "podfsm.drivers.factory"}


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def test_the_controller_makes_no_system_call_of_its_own() -> None:
    """Every system operation of the controller goes through a driver (pidfds, /proc, pins,
    directories, locks): what it uses of `os` is path arithmetic, and it imports no module
    whose use is I/O."""
    bad: set[str] = set()
    for path in sorted((_PACKAGE / "controller").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # only whole chains: `os.path.join`, not also its `os.path`
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {f"{node.module}.{a.name}" for a in node.names}
                if node.module == "os" or node.module.startswith(_SYSTEM_MODULES):
                    bad.add(f"{path.name}: from {node.module} import ...")
                if node.module.startswith("podfsm.drivers"):
                    mods = names if node.module == "podfsm.drivers" else {node.module}
                    bad.update(f"{path.name}: {m}" for m in mods - _DRIVER_MODULES)
            elif isinstance(node, ast.Import):
                bad.update(f"{path.name}: import {a.name}" for a in node.names
                           if a.name.startswith(_SYSTEM_MODULES))
            elif isinstance(node, ast.Attribute) and id(node) not in inner:
                name = _dotted(node)
                if name is None:
                    continue
                if name.startswith("os."):
                    used = next((p for p in _OS_PURE if name == p or name.startswith(p + ".")),
                                None)
                    if used is None and (path.name, name) not in _OS_JUSTIFIED:
                        bad.add(f"{path.name}: {name}")
                elif name in ("anyio.wait_readable", "anyio.open_file", "anyio.Path",
                              "anyio.run_process", "anyio.open_process"):
                    bad.add(f"{path.name}: {name}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == "open"):
                bad.add(f"{path.name}: open()")
    assert not bad, f"system calls in podfsm/controller (use a driver): {sorted(bad)}"


#: The house's limit on a module's length: past it, a module is split into cohesive parts.
MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines() -> None:
    long = {str(path.relative_to(_PACKAGE)): n for path in sorted(_PACKAGE.rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"
