"""The package's layout: its modules import each other without cycles.

Only imports that run when a module is imported count: those at module level (inside classes,
``if``/``try`` blocks), not those inside functions (run later, on call) or under
``if TYPE_CHECKING:`` (never run). Each is resolved to the tformer module it loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tformer

ROOT = Path(tformer.__file__).resolve().parent
PACKAGE = "tformer"


def _modules(root: Path, package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_imports(body: list[ast.stmt]):
    """Import statements executed when the module runs: not in functions, not under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_time_imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None) or []
                for child in children:
                    if isinstance(child, (ast.ExceptHandler, ast.match_case)):
                        yield from _import_time_imports(child.body)
                    elif isinstance(child, ast.stmt):
                        yield from _import_time_imports([child])


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = ROOT, package_name: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: the tformer modules it needs loaded at import time}``.

    ``import a.b`` and ``from a import b`` (``b`` a submodule) need ``a.b`` and the packages above it,
    except the importer's own enclosing packages, which are already being imported (Python hands out the
    partly initialized package, and loading a submodule of it is fine). ``from a import name`` with ``name``
    an attribute needs ``a`` itself to have run, even where ``a`` encloses the importer: that is a cycle.
    """
    modules = _modules(root, package_name)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        enclosing = set(_ancestors(name)) | {name}
        edges = set()

        def need(target: str, *, attribute: bool = False) -> None:
            if target in modules and target != name and (attribute or target not in enclosing):
                edges.add(target)
            edges.update(p for p in _ancestors(target) if p in modules and p not in enclosing)

        for node in _import_time_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    need(alias.name)
                continue
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    need(f"{base}.{alias.name}")
                else:
                    need(base, attribute=True)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as ``[a, b, ..., a]``."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A concrete cycle through the component's first module (breadth-first, so a shortest one)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_the_import_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"tformer", "tformer.blocks", "tformer.analysis", "tformer.analysis.monitor"} <= set(graph)
    assert "tformer.config" in graph["tformer.blocks"]  # from .config import BlockConfig


def test_which_imports_count(tmp_path):
    files = {
        "__init__.py": "from . import a\nVERSION = 1\n",
        "a.py": "from . import b  # a submodule of the package being imported: fine\nfrom .sub.c import X\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
                "def f():\n    from .a import A\nclass K:\n    from . import d\n",
        "d.py": "try:\n    from .e import E\nexcept ImportError:\n    pass\n",
        "e.py": "from . import VERSION  # an attribute of the package: needs its __init__ to have run\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..b import K\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(tmp_path / "pkg", "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.sub", "pkg.sub.c"}, "pkg.b": {"pkg.d"},
                     "pkg.d": {"pkg.e"}, "pkg.e": {"pkg"}, "pkg.sub": set(), "pkg.sub.c": {"pkg.b"}}
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg.b", "pkg.d", "pkg.e", "pkg"]]


def test_find_cycles_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_package_imports_form_no_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
