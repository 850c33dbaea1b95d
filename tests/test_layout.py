"""The package's folder tree is its architecture: no import cycle, no import against the layers.

Imports are read from the source (every `import` / `from ... import`, also inside functions
and `TYPE_CHECKING` blocks), so a lazy import cannot hide a cycle or a layering breach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prunekit"
CORE = {"errors", "settings", "registry", "options", "progress", "process_memory"}
PUBLIC = {"__init__", "__main__", "api", "cli"}

# layer -> the layers it may import (besides itself and the cross-cutting core)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": set(),
    "data": set(),
    "engine": {"models"},
    "surgery": {"models"},
    "eval": {"models", "data"},
    "inference": {"models"},
    "export": {"models", "surgery"},
    "methods": {"models", "data", "engine", "surgery", "eval", "recovery"},
    "allocations": {"models", "data", "engine", "surgery", "eval", "methods"},
    "recovery": {"models", "data", "engine", "eval", "export"},
    "recipes": {"models", "data", "export", "recovery", "api"},
    "api": {
        "models",
        "data",
        "engine",
        "surgery",
        "eval",
        "export",
        "methods",
        "allocations",
        "inference",
    },
    "bench": {
        "models",
        "data",
        "engine",
        "surgery",
        "eval",
        "export",
        "methods",
        "allocations",
        "inference",
        "recovery",
        "api",
        "root",
    },
    "cli": {
        "models",
        "data",
        "engine",
        "surgery",
        "eval",
        "export",
        "methods",
        "allocations",
        "inference",
        "recovery",
        "recipes",
        "api",
        "bench",
        "root",
    },
    "root": {"api", "models", "recovery"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str:
    """`prunekit.methods.width.flap` -> "methods"; the root's modules are "root" or "core";
    `python -m prunekit` (`__main__`) is the command line."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "__main__":
        return "cli"
    if len(parts) == 1:
        return "root"
    return "core" if parts[1] in CORE else parts[1]


def imports_of(module: str) -> set[str]:
    """prunekit modules that `module` imports (a `from pkg import sub` names pkg.sub)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "prunekit")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.split(".")[0] != "prunekit":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_folder_says_what_it_owns() -> None:
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc) > 40, f"{module} has no docstring saying what it owns"


def test_root_holds_only_the_public_face_and_core() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose <= PUBLIC | CORE, f"loose modules in the package root: {loose - PUBLIC - CORE}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `graph` as a list of modules, or None (package-to-child edges ignored:
    a package's __init__ importing its own children is how registration works)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(d for d in graph[module] if not d.startswith(f"{module}.")):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in graph.items():
        layer = layer_of(module)
        for dep in deps:
            other = layer_of(dep)
            if other not in (layer, "core") and other not in ALLOWED[layer]:
                bad.append(f"{module} ({layer}) imports {dep} ({other})")
    return sorted(bad)


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_follow_the_layers() -> None:
    bad = violations(GRAPH)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [("methods", "cli"), ("engine", "methods"), ("models", "methods"), ("eval", "methods")],
)
def test_named_rules_are_enforced(importer: str, forbidden: str) -> None:
    assert forbidden not in ALLOWED[importer]


def test_the_checks_see_a_breach() -> None:
    """An engine module importing a method (even lazily) is both a breach and, here, a cycle."""
    graph = {m: set(d) for m, d in GRAPH.items()}
    graph["prunekit.engine.runner"].add("prunekit.methods.unstructured.layerwise")
    assert any("prunekit.engine.runner (engine)" in line for line in violations(graph))
    assert find_cycle(graph) is not None
    assert "prunekit.engine.runner" in GRAPH["prunekit.methods.unstructured.layerwise"]


def test_public_import_paths() -> None:
    import prunekit
    from prunekit.methods import register  # noqa: F401

    for name in ("load_model", "prune", "evaluate", "save", "load_pruned", "LoadedModel"):
        assert callable(getattr(prunekit, name))
