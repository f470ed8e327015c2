"""Layers of ``treadmill/``, read from the imports (an AST walk, nothing is imported).

- A role package (``switchboard``, ``supervisor``, ``proxy``, ``logserver``,
  ``imagestore``, ``cli``) imports only itself and the shared packages
  (``common``, ``protocol``, ``images``, ``dev``); the shared packages import no role;
  ``dev`` (development tooling) may import anything. Every import counts, in
  functions too.
- No import circles between modules. Module-level imports count, those under
  ``if TYPE_CHECKING:`` too (a circle of type hints still says that two modules
  know each other: move the shared type to a third module).
- No test module imports another test module (``tests/**/test_*.py``): what tests
  share lives in a support module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "treadmill"
ROLES = frozenset({"switchboard", "supervisor", "proxy", "logserver", "imagestore", "cli"})
SHARED = frozenset({"common", "protocol", "images", "dev"})
ANYTHING_GOES = frozenset({"dev"})

# Circles tolerated for now, as exact module sets (empty: issue 17 opened the three of
# review §2.2). The test fails when one is gone or changes, so the list only shrinks.
KNOWN_CIRCLES: set[frozenset[str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    top_level: bool  # at module level (under if/try included), not in a function
    type_checking: bool  # under ``if TYPE_CHECKING:``


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The treadmill module ``name`` names, or the nearest package that holds it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, top: bool, typing_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name) if alias.name.startswith("treadmill") else None
                    if target:
                        yield Import(module, target, child.lineno, top, typing_only)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if not base.startswith("treadmill"):
                    continue
                for alias in child.names:
                    target = _resolve(f"{base}.{alias.name}")
                    if target:
                        yield Import(module, target, child.lineno, top, typing_only)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, False, typing_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), top, True)
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), top, typing_only)
            else:
                yield from visit(child, top, typing_only)

    yield from visit(tree, True, False)


IMPORTS = [i for module, path in MODULES.items() for i in _imports(module, path)]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_role_imports_another_role() -> None:
    wrong = []
    for i in IMPORTS:
        importer, imported = _package(i.importer), _package(i.imported)
        if importer == imported or importer in ANYTHING_GOES or imported in SHARED:
            continue
        if imported in ROLES or importer in SHARED:
            wrong.append(f"{MODULES[i.importer].relative_to(ROOT.parent)}:{i.line}: "
                         f"{i.importer} imports {i.imported}")
    assert not wrong, (
        "a role imports another role (or shared code imports a role); move what both need "
        "to treadmill/protocol (wire contracts) or treadmill/common (shared code):\n"
        + "\n".join(wrong))


def _circles() -> tuple[list[frozenset[str]], dict[tuple[str, str], Import]]:
    """Strongly connected components of the module-level import graph (Tarjan)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    how: dict[tuple[str, str], Import] = {}
    for i in IMPORTS:
        if i.top_level and i.importer != i.imported:
            edges[i.importer].add(i.imported)
            known = how.get((i.importer, i.imported))
            if known is None or (known.type_checking and not i.type_checking):
                how[(i.importer, i.imported)] = i
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for module in sorted(MODULES):
        if module not in index:
            connect(module)
    return found, how


def _describe(circle: frozenset[str], how: dict[tuple[str, str], Import]) -> str:
    lines = []
    for (importer, imported), i in sorted(how.items()):
        if importer in circle and imported in circle:
            note = ("  (under `if TYPE_CHECKING:`: still a circle; move the shared type to "
                    "a module both can import)" if i.type_checking else "")
            lines.append(f"  {MODULES[importer].relative_to(ROOT.parent)}:{i.line} imports "
                         f"{imported}{note}")
    return "\n".join(lines)


def test_no_import_circles() -> None:
    circles, how = _circles()
    new = [c for c in circles if c not in KNOWN_CIRCLES]
    assert not new, "import circles between modules:\n" + "\n\n".join(
        _describe(c, how) for c in new)


def test_known_circles_still_exist() -> None:
    circles, _ = _circles()
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not gone, f"remove these from KNOWN_CIRCLES in {__file__}, they are gone: {gone}"


def test_the_walk_sees_imports() -> None:
    assert len(MODULES) > 100
    assert any(i.importer == "treadmill.proxy.control" and i.imported == "treadmill.protocol.proxy"
               for i in IMPORTS)


# -- the tests themselves ---------------------------------------------------------------

TESTS = ROOT.parent / "tests"


def imports_of_test_modules(path: Path) -> list[str]:
    """The ``tests.…test_*`` modules that ``path`` imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found += [n for n in names
                  if n.startswith("tests.") and n.rsplit(".", 1)[-1].startswith("test_")]
    return sorted(found)


def test_no_test_module_imports_another() -> None:
    """What two test modules share lives in a support module (``tests/support.py``,
    ``tests/<area>/support.py``, ``tests/util``, ``tests/fakes``), so each test module
    runs alone and is collected once."""
    offenders = {str(p.relative_to(TESTS)): imports_of_test_modules(p)
                 for p in sorted(TESTS.rglob("*.py"))}
    assert {p: found for p, found in offenders.items() if found} == {}


def test_the_test_import_check_sees_one(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("def f():\n    from tests.switchboard.test_links import x\n"
                     "import tests.test_e2e_jobs\nfrom tests.support import Client\n")
    assert sorted(imports_of_test_modules(probe)) == [
        "tests.switchboard.test_links", "tests.test_e2e_jobs"]
