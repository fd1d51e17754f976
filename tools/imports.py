"""vllmd's import graph between its top-level units, with the upward imports and the loops.

A unit is a subpackage of vllmd/ or a top-level module. An edge A -> B is any `import` of B
inside A, or `importlib.import_module` of a constant name (at module level or inside a
function; imports under `if TYPE_CHECKING:` aside, as they never run). The layers below are
the architecture's order, lowest first (docs/architecture.md); an edge from a lower unit to
a higher one runs back up.

    python tools/imports.py            # the edges by layer, upward ones and the loops
    python tools/imports.py --dot      # the graph for graphviz
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllmd"

# Lowest first. A unit may import any unit on a lower layer or its own; one on a higher
# layer is an upward import. Units on one line share a layer.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "units", "weights", "sizing"),
    ("log", "events", "systemd"),
    ("httpserver",),
    ("devices",),
    ("config",),
    ("overrides",),
    ("engine",),
    ("store",),
    ("context",),
    ("instance",),
    ("placement",),
    ("alerts", "metrics"),
    ("supervisor",),
    ("gateway", "control"),
    ("wiring",),
    ("daemon",),
    ("cli",),
]


def units() -> list[str]:
    """Every subpackage of vllmd/ (with or without an __init__.py) and top-level module."""
    found = []
    for path in sorted(PACKAGE.iterdir()):
        if path.name in ("__init__.py", "__main__.py") or path.name.startswith("."):
            continue
        if path.is_dir() and any(path.rglob("*.py")):
            found.append(path.name)
        elif path.suffix == ".py":
            found.append(path.stem)
    return found


def _unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "vllmd" or len(parts) < 2:
        return None
    return parts[1]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Every module imported by `tree` (absolute names), skipping TYPE_CHECKING blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno  # importlib.import_module("vllmd.x")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if node.module is None or target.count(".") < 2:
                # `from vllmd import config` or `from . import x`: each name may be a unit.
                for alias in node.names:
                    yield f"{target}.{alias.name}", node.lineno
            else:
                yield target, node.lineno
        stack.extend(ast.iter_child_nodes(node))


def edges() -> dict[tuple[str, str], list[str]]:
    """(importer unit, imported unit) -> the places, as 'file:line'."""
    known = set(units())
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        is_package = path.name == "__init__.py"
        parts = list(rel.with_suffix("").parts)
        if is_package:
            parts = parts[:-1]
        module = ".".join(parts)
        source = _unit_of(module)
        if source is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, line in _imports(tree, module, is_package):
            unit = _unit_of(target)
            if unit is None or unit == source or unit not in known:
                continue
            place = f"{rel}:{line}"
            if place not in found[(source, unit)]:
                found[(source, unit)].append(place)
    return dict(found)


def layer_of() -> dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def upward(graph: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    rank = layer_of()
    return {
        (a, b): where
        for (a, b), where in graph.items()
        if rank.get(a, len(LAYERS)) < rank.get(b, len(LAYERS))
    }


def loops(graph: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan's algorithm)."""
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in graph:
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
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
                found.append(sorted(component))

    for v in sorted({u for edge in graph for u in edge}):
        if v not in index:
            visit(v)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print the graph for graphviz")
    args = parser.parse_args(argv)
    graph = edges()
    ups = upward(graph)
    if args.dot:
        print("digraph vllmd {\n  rankdir=BT;")
        for a, b in sorted(graph):
            style = ' [color=red, label="up"]' if (a, b) in ups else ""
            print(f'  "{a}" -> "{b}"{style};')
        print("}")
        return 0
    every = units()
    rank = layer_of()
    unplaced = [u for u in every if u not in rank]
    print(f"{len(every)} units, {len(graph)} edges between them")
    for i, layer in enumerate(LAYERS):
        for unit in layer:
            if unit not in every:
                continue
            targets = sorted(b for a, b in graph if a == unit)
            print(f"  {i:2d} {unit:12s} -> {', '.join(targets) or '-'}")
    if unplaced:
        print(f"not in any layer: {', '.join(unplaced)}")
    print(f"upward imports: {sum(len(w) for w in ups.values())} ({len(ups)} unit pairs)")
    for (a, b), where in sorted(ups.items()):
        print(f"  {a} -> {b}: {', '.join(where)}")
    cycles = loops(graph)
    print(f"import loops: {len(cycles)}")
    for cycle in cycles:
        print(f"  {len(cycle)} of {len(every)} units: {', '.join(cycle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
