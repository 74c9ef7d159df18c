"""loadtests/ imports in one direction: the module graph (every import, lazy ones included)
has no cycle, so the runner's shared pieces never reach back into a benchmark's CLI."""

from __future__ import annotations

import ast
from pathlib import Path

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in LOADTESTS.glob("*.py"):
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "loadtests":
                    edges |= {alias.name for alias in node.names}
                elif node.module.startswith("loadtests."):
                    edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges |= {a.name.split(".")[1] for a in node.names
                          if a.name.startswith("loadtests.")}
        graph[path.stem] = edges - {path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for nxt in sorted(graph.get(name, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)) is not None:
            return found
    return None


def test_loadtests_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert "runner" in graph and "suite" in graph["benchmark"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
