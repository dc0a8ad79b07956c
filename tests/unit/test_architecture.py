"""The architecture in the tree: layers without import cycles, modules small enough to read.

Every module under deadlift/ is parsed (not imported), and each of its imports,
function-level and ``TYPE_CHECKING`` ones included, becomes an edge to the
module it names: ``from deadlift.x import y`` names ``deadlift.x.y`` when that is
a module, else ``deadlift.x``. The graph must have no cycle, and no module may
pass MAX_LINES (STYLE.md: split a module when it passes ~600 lines).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "deadlift"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def absolute(name: str, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` starts from, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    is_package = modules()[name].name == "__init__.py"
    base = name.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported(name: str) -> Iterator[str]:
    """The deadlift modules ``name`` imports, anywhere in its source."""
    known = modules()
    tree = ast.parse(known[name].read_text(), filename=str(known[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(name, node)
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # `import deadlift.a.b` binds deadlift but loads deadlift.a.b: the longest known name.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("deadlift") and target != name:
                yield target


def import_graph() -> dict[str, set[str]]:
    return {name: set(imported(name)) for name in modules()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def path_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle inside ``component``, as ``a -> b -> … -> a`` (for the failure message)."""
    members = set(component)
    start = component[0]
    trail, seen = [start], {start}
    while True:
        options = sorted(graph[trail[-1]] & members)
        nxt = next((o for o in options if o == start or o not in seen), options[0])
        if nxt in seen:
            return [*trail[trail.index(nxt) :], nxt]
        trail.append(nxt)
        seen.add(nxt)


def test_the_parser_sees_every_kind_of_import() -> None:
    graph = import_graph()
    # A sanity check of the edges themselves, from modules whose imports are well known.
    assert "deadlift.runtime.step" in graph["deadlift.runtime.worker"]  # from … import Class
    assert "deadlift.model.topology" in graph["deadlift.runtime.step"]  # from package import mod
    assert "deadlift.bus" in graph["deadlift.runtime.worker"]  # from deadlift import bus
    assert len(graph) >= 40


def test_no_import_cycles_between_modules() -> None:
    graph = import_graph()
    found = [" -> ".join(path_through(graph, c)) for c in cycles(graph)]
    assert found == [], "import cycles:\n  " + "\n  ".join(found)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert path_through(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_600_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    over = sorted(f"{name} ({lines} lines)" for name, lines in sizes.items() if lines > MAX_LINES)
    assert over == [], f"split these modules (over {MAX_LINES} lines): " + ", ".join(over)
