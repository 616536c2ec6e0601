"""The library's import graph: no cycle between its modules, every module importable on its own in a fresh
interpreter, and no kfp anywhere in src/flexi_jest (KFP lives in components/ and pipelines/)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "flexi_jest"


def library_modules() -> dict[str, Path]:
    """Every module of the library by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def function_bodies(tree: ast.Module) -> set[int]:
    """ids of the nodes inside function bodies: their imports run when the function is called, not on import."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def imported_names(path: Path, module: str, is_package: bool) -> tuple[set[str], set[str]]:
    """(the absolute names a module imports when it is imported, those its functions import when called);
    relative imports resolved, `from a import b` giving both a and a.b (b may be a submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    lazy_nodes = function_bodies(tree)
    eager, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = {base} | {f"{base}.{alias.name}" for alias in node.names}
        else:
            continue
        (lazy if id(node) in lazy_nodes else eager).update(names)
    return eager, lazy


def library_import_graph() -> dict[str, set[str]]:
    """module -> the library modules it depends on. An import when the module is imported: the module and its
    packages (importing a.b.c runs a and a.b first), but not the module's own packages (Python has them in
    sys.modules before it runs the module). A function's import: the module it names (by the time a function runs,
    the packages its module sits in are loaded)."""
    modules = library_modules()
    graph = {}
    for module, path in modules.items():
        eager, lazy = imported_names(path, module, path.name == "__init__.py")
        targets = set(lazy)
        for name in eager:
            parts = name.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, len(module.split(".")) + 1)}
        graph[module] = {t for t in targets if t in modules and t not in own_packages}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_tells_imports_on_import_from_imports_in_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import flexi_jest.config\nfrom flexi_jest.data import shards\n"
                      "try:\n    from . import losses\nexcept ImportError:\n    pass\n"
                      "class A:\n    def f(self):\n        from flexi_jest.train import train_learner\n")
    eager, lazy = imported_names(source, "flexi_jest.selection", is_package=False)
    assert {"flexi_jest.config", "flexi_jest.data.shards", "flexi_jest.losses"} <= eager
    assert "flexi_jest.train" in lazy and "flexi_jest.train" not in eager


def test_the_library_has_no_import_cycle():
    """Neither at module level nor through a function's import (a cycle that works only because one side
    imports late is still two modules that need each other)."""
    cycle = find_cycle(library_import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_library_never_imports_kfp():
    """Not at module level, nor in a function: the library runs where kfp is not installed."""
    found = []
    for module, path in library_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{module}:{node.lineno} imports {n}" for n in names if n == "kfp" or n.startswith("kfp.")]
    assert not found, found


# Each module imported first, with no flexi_jest module loaded yet (third-party ones stay loaded, so this runs in
# seconds; a module-level cycle that Python cannot resolve fails here as a partially initialised module).
EVERY_MODULE_ON_ITS_OWN = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "flexi_jest" or m.startswith("flexi_jest.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps({"failures": failures, "kfp": sorted(m for m in sys.modules if m == "kfp" or m.startswith("kfp."))}))
"""


@pytest.mark.slow  # reason: one fresh interpreter importing each of the library's modules anew (20 s on 2 cores);
# the import graph's checks above (no cycle, no kfp) stay in the default suite
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = sorted(library_modules())
    done = subprocess.run([sys.executable, "-c", EVERY_MODULE_ON_ITS_OWN, json.dumps(names)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n".join(f"{name}:\n{trace}" for name, trace in report["failures"].items())
    assert not report["kfp"], f"importing the library loaded {report['kfp'][:3]} ..."
