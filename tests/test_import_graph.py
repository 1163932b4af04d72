"""No import cycles in the package: every import of every module (module level and inside
functions, Python and Cython) is an edge; any strongly connected component of more than one
module, or a module importing itself, fails with the cycle spelled out."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "rustane"

_PYX_IMPORT = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+c?import\s+([^#\n]+)|c?import\s+([\w.]+))", re.M)


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, is_pkg: bool, name: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement in the file."""
    base = name if is_pkg else name.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []

    def absolute(mod: str, level: int) -> str:
        if level == 0:
            return mod
        parts = base.split(".")
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([mod] if mod else []))

    text = path.read_text()
    if path.suffix == ".py":
        tree = ast.parse(text, str(path))
        # ``if TYPE_CHECKING:`` imports never run, so they cannot form a cycle
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                out += [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                out.append((absolute(node.module or "", node.level), [a.name for a in node.names]))
    else:  # Cython: the import lines are Python syntax
        for m in _PYX_IMPORT.finditer(text):
            if m.group(3):
                out.append((m.group(3), []))
            else:
                dots = len(m.group(1)) - len(m.group(1).lstrip("."))
                names = [n.strip().split(" as ")[0].strip("() ") for n in m.group(2).split(",")]
                out.append((absolute(m.group(1).lstrip("."), dots), [n for n in names if n]))
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from p import m`` counts as importing p.m when
    m is a module, else p)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".pyx") and "__pycache__" not in path.parts:
            name, is_pkg = _module_name(root, path)
            files[name] = (path, is_pkg)
    graph: dict[str, set[str]] = {name: set() for name in files}
    top = root.name
    for name, (path, is_pkg) in files.items():
        for mod, names in _imports(path, is_pkg, name):
            if mod != top and not mod.startswith(top + "."):
                continue
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in files]
            if len(targets) < len(names) or not names:
                targets.append(mod)
            graph[name].update(t for t in targets if t in files)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_in(graph: dict[str, set[str]], comp: list[str]) -> str:
    """One concrete cycle through the component, for the failure message."""
    members = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1 or (back and graph[start] == {start}):
            return " -> ".join(path + [start])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:
            return " -> ".join(path + [nxt[0]]) if nxt else " <-> ".join(comp)
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_package_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "rustane.train" in graph and "rustane._ane" in graph
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_path_in(graph, c) for c in found)


def test_function_level_and_cython_imports_are_edges():
    """The walker sees imports inside functions and in .pyx files (the cycles it must catch were
    of that kind)."""
    graph = import_graph(PACKAGE)
    # rustane.backends.ane.backend imports rustane._ane only inside _runtime()
    assert "rustane._ane" in graph["rustane.backends.ane.backend"]
    # the compiled runtime raises the backend's error type
    assert "rustane.backends.ane.errors" in graph["rustane._ane"]
    # the interpreter registers its op builders with a function-level import
    assert "rustane.mil.ops" in graph["rustane.mil.interp"]


def test_detects_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import g\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.d\n")
    (pkg / "d.py").write_text("def h():\n    from pkg import a\n")
    (pkg / "e.pyx").write_text("from pkg.e import x\n")  # a Cython module importing itself
    (pkg / "f.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "a.py").write_text("from . import b, f\n")  # f -> a only for type checkers: no cycle
    graph = import_graph(pkg)
    found = cycles(graph)
    assert ["pkg.a", "pkg.b", "pkg.d", "pkg.sub.c"] in found
    assert ["pkg.e"] in found
    assert "pkg.a -> pkg.b -> pkg.sub.c -> pkg.d -> pkg.a" == _path_in(graph, ["pkg.a", "pkg.b", "pkg.d", "pkg.sub.c"])
    (pkg / "d.py").write_text("def h():\n    from pkg import sub\n")
    assert cycles(import_graph(pkg)) == [["pkg.e"]]
