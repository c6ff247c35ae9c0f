"""The import graph of qsd_trio has no cycle, and every lazy import says why.

The graph is read from the source with ``ast``: an edge for each import a
module runs when it is imported (module level, class bodies, ``try``/``if``
blocks; not ``if TYPE_CHECKING:``, which never runs).  A cycle makes the
import order decide which module sees a half-initialised other, so none is
allowed.  An import inside a function is lazy: it must not be there to hide
a cycle, and a comment on its line or just above it says why it waits (the
cost of a library few runs need, a driver chosen by an option, a module that
registers itself, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qsd_trio"


def modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (path, is a package) for every .py under ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def _imported(name: str, is_package: bool, node: ast.Import | ast.ImportFrom,
              known: dict) -> set[str]:
    """The modules of ``known`` that running ``node`` in ``name`` imports.

    ``from .pkg import x`` imports ``pkg.x`` when that is a module, else
    ``pkg``; importing ``a.b.c`` also runs ``a`` and ``a.b``, except the
    importing module's own packages (already running before it).
    """
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".")
            if not is_package:
                base.pop()
            base = base[:len(base) - (node.level - 1)]
            where = ".".join(base + ([node.module] if node.module else []))
        else:
            where = node.module or ""
        targets = [f"{where}.{a.name}" if f"{where}.{a.name}" in known else where
                   for a in node.names]
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in known and mod != name and not name.startswith(mod + "."):
                out.add(mod)
    return out


def _imports(body: list[ast.stmt], lazy: bool, out: list) -> None:
    for stmt in body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            out.append((stmt, lazy))
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            _imports(stmt.body, True, out)
        elif isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            _imports(stmt.orelse, lazy, out)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for sub in getattr(stmt, field, None) or []:
                    if isinstance(sub, ast.stmt):
                        _imports([sub], lazy, out)
                    elif isinstance(sub, ast.ExceptHandler | ast.match_case):
                        _imports(sub.body, lazy, out)


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[tuple[Path, int]]]:
    """(module -> modules it imports when imported, [(file, line) of each
    function-level import of the package])."""
    known = modules(package)
    graph: dict[str, set[str]] = {}
    lazy_imports = []
    for name, (path, is_package) in known.items():
        found: list = []
        _imports(ast.parse(path.read_text(), str(path)).body, False, found)
        graph[name] = set()
        for node, lazy in found:
            targets = _imported(name, is_package, node, known)
            if lazy and targets:
                lazy_imports.append((path, node.lineno))
            elif not lazy:
                graph[name] |= targets
    return graph, lazy_imports


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (cycle := visit(mod)):
            return cycle
    return None


def has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line(s) just above it."""
    if "#" in lines[lineno - 1]:
        return True
    above = lineno - 2
    return above >= 0 and lines[above].lstrip().startswith("#")


def test_no_import_cycle():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 50  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_lazy_imports_say_why():
    _, lazy_imports = import_graph(PACKAGE)
    silent = []
    for path, lineno in lazy_imports:
        rel = str(path.relative_to(PACKAGE.parent))
        if not has_reason(path.read_text().splitlines(), lineno):
            silent.append(f"{rel}:{lineno}")
    assert not silent, "function-level imports without a reason: " + ", ".join(silent)


@pytest.mark.parametrize("lazy", [False, True])
def test_checker_sees_a_cycle(tmp_path, lazy):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import pkg.c\n")
    if lazy:
        (pkg / "c.py").write_text("def f():\n    from . import a\n")
    else:
        (pkg / "c.py").write_text("try:\n    from .a import x\nexcept ImportError:\n    pass\n")
    graph, lazy_imports = import_graph(pkg)
    if lazy:
        assert find_cycle(graph) is None
        assert [(p.name, n) for p, n in lazy_imports] == [("c.py", 2)]
        assert not has_reason((pkg / "c.py").read_text().splitlines(), 2)
    else:
        assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
