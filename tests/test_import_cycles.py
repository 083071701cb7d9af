"""No import cycles among the project's modules (edgetrain/, firmware_bridge/, models/).

Every import counts, also the lazy ones inside functions and the TYPE_CHECKING ones: a cycle hidden behind
either still ties two modules into one unit that neither can be read, tested or moved without the other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgetrain", "firmware_bridge", "models")


def _module_names() -> dict[str, Path]:
    """Map each project module's dotted name (a package by its __init__) to its file."""
    names: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """The module `name` and every package above it: importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()


def _ancestors(name: str) -> set[str]:
    """The packages that contain module `name`: Python has begun running them before `name`, so an import of
    one of them from inside adds no edge (their own imports are counted where they are written)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that module `name` imports anywhere in its body (lazy and TYPE_CHECKING included)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _with_parents(alias.name, modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= _with_parents(target, modules)
            for alias in node.names:
                # `from a.b import c` where a.b.c is a module imports that module too
                if f"{target}.{alias.name}" in modules:
                    found |= _with_parents(f"{target}.{alias.name}", modules)
    return found - _ancestors(name) - {name}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = _import_graph()
    assert "edgetrain.model" in graph and "firmware_bridge.wire.link" in graph
    cycles = _strongly_connected(graph)
    described = []
    for component in cycles:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        described.append("{" + ", ".join(component) + "}: " + "; ".join(edges))
    assert not cycles, "import cycles:\n" + "\n".join(described)
