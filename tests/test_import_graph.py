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
