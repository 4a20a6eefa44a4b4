"""The package's import graph has no cycle: no module imports one that imports it back, directly
or through others (read from the source with ast, function-level imports included), and the
shared core imports nothing above the operator layer, the numerics nothing of the package."""

from __future__ import annotations

import ast
import pathlib

import fusedclip

PACKAGE = pathlib.Path(fusedclip.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("fusedclip",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: the fusedclip modules it imports}, every import statement anywhere in it."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fusedclip":
                for alias in node.names:  # `from fusedclip import clip` imports fusedclip.clip
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "fusedclip"}
        graph[name] = {d for d in deps if d != name and d in modules and d != "fusedclip"}
    return graph


def _cycle_from(start: str, graph: dict[str, set[str]]):
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in graph[node]:
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


def test_no_import_cycle():
    graph = _imports()
    cycles = [c for c in (_cycle_from(m, graph) for m in sorted(graph)) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_and_clip_imports():
    graph = _imports()
    allowed = {"fusedclip._backends", "fusedclip._ops", "fusedclip.numerics", "fusedclip.reference"}
    assert graph["fusedclip._core"] <= allowed, graph["fusedclip._core"]
    assert graph["fusedclip.numerics"] == set(), graph["fusedclip.numerics"]
    importers_of_clip = {m for m, deps in graph.items() if "fusedclip.clip" in deps}
    # what clip.py imports never imports it back (the features above it may)
    assert not importers_of_clip & graph["fusedclip.clip"], importers_of_clip & graph["fusedclip.clip"]
