"""The package's import graph points one way, from the command line down to the tensor operations.

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``,
because a circle of any kind makes modules impossible to read or test alone.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import hfmerge

PACKAGE = Path(hfmerge.__file__).parent


def _unit(module: str) -> str:
    """A module's unit: a subpackage (``hfmerge.engine``) or a top-level module (``hfmerge.publish.card``)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("hfmerge.") and _unit(name) != _unit(module):
                    graph[_unit(module)].add(_unit(name))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                found.append(path + [nxt])
            elif nxt not in path and nxt > path[0]:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_the_package_has_no_import_cycles():
    graph = _imports()
    graph.pop("hfmerge", None)  # the package namespace re-exports the public API lazily
    assert _cycles(graph) == []


def test_methods_do_not_talk_to_the_hub():
    assert "hfmerge.hub" not in _imports()["hfmerge.methods"]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name; a package by its own name (its ``__init__``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _module_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level, in functions or under ``TYPE_CHECKING``.

    ``from hfmerge.adapters import vit`` imports the module ``hfmerge.adapters.vit``; ``from
    hfmerge.adapters import FamilyAdapter`` the package ``hfmerge.adapters``; a relative import resolves
    against the importing module.
    """
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for name in names:
                while name not in modules and "." in name:  # an attribute path: its module
                    name = name.rpartition(".")[0]
                if name in modules and name != module:
                    graph[module].add(name)
    return graph


def _inside(package: str, graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between ``package``'s own modules and subpackages (a subpackage is one node, with
    every module in it); ``package``'s ``__init__`` is a node too."""

    def member(module: str) -> str | None:
        if module == package:
            return package
        if not module.startswith(f"{package}."):
            return None
        return f"{package}.{module[len(package) + 1:].split('.')[0]}"

    inside: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        if (a := member(module)) is None:
            continue
        for name in imported:
            if (b := member(name)) is not None and b != a:
                inside[a].add(b)
    return inside


def test_no_package_has_an_import_cycle_between_its_own_modules():
    """Inside each subpackage, imports point one way too (``hfmerge.adapters``: the family files, ``layout``,
    ``base``, then ``neurons``, ``depth`` and ``forward_order``, which import none of the others). The
    package itself is the test above: its namespace re-exports lazily from every unit."""
    graph = _module_imports()
    packages = sorted(m for m, path in _modules().items() if path.name == "__init__.py" and m != "hfmerge")
    assert "hfmerge.adapters" in packages and "hfmerge.methods.gating" in packages
    cycles = {package: found for package in packages if (found := _cycles(_inside(package, graph)))}
    assert cycles == {}
