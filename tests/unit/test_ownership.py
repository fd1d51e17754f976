"""Ownership rules of docs/architecture.md, checked over vllmd/'s syntax trees and imports:
nobody writes another object's attributes (the owner changes its state; others call it or
read a frozen view), no module grows past what one owner can hold, and imports run only down
the layers (tools/imports.py), with no loop between units."""

from __future__ import annotations

import ast
from pathlib import Path

from tools import imports

PACKAGE = Path(__file__).resolve().parents[2] / "vllmd"
MAX_LINES = 400

# Attribute writes whose target is not `self`/`cls`, each a real exception (none: the demo
# models' generator, which assembles a tokenizer by attribute as `tokenizers` asks, is a
# development tool in tools/, not part of the daemon).
ALLOWED: dict[str, set[str]] = {}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _foreign_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        for target in targets:
            for each in ast.walk(target):
                if isinstance(each, ast.Attribute) and isinstance(each.ctx, ast.Store | ast.Del):
                    owner = each.value
                    if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                        continue
                    found.append(f"{ast.unparse(each)} (line {each.lineno})")
    return found


def test_no_module_writes_another_objects_attributes() -> None:
    problems = []
    for path in _modules():
        rel = str(path.relative_to(PACKAGE.parent))
        allowed = ALLOWED.get(rel, set())
        for write in _foreign_writes(path):
            if write.split(" (line")[0] not in allowed:
                problems.append(f"{rel}: {write}")
    assert not problems, "attribute writes outside their owner:\n" + "\n".join(problems)


def test_the_check_sees_a_foreign_write(tmp_path: Path) -> None:
    """The walker itself: `other.y += 2` and `del a.b.c` are found; `self.x = 1`, `x = 1` and
    a read `other.z` are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(self, other, a):\n    self.x = 1\n    x = other.z\n    other.y += 2\n    del a.b.c\n"
    )
    assert _foreign_writes(sample) == ["other.y (line 4)", "a.b.c (line 5)"]


def test_no_module_is_longer_than_one_owner_can_hold() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in _modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): {long}"


# Imports that run back up the layers of tools/imports.py, each with its reason in
# docs/architecture.md. None today; at most one may ever be added.
UPWARD_ALLOWED: set[tuple[str, str]] = set()


def test_every_unit_has_a_layer() -> None:
    """A new package or top-level module is placed in tools/imports.py's LAYERS (and in
    docs/architecture.md) before the arrows can be checked."""
    placed = {unit for layer in imports.LAYERS for unit in layer}
    assert set(imports.units()) - placed == set()


def test_no_import_runs_back_up_the_layers() -> None:
    """client -> gateway -> supervisor -> placement -> instance -> engine -> process: a
    lower unit never imports a higher one (TYPE_CHECKING imports aside)."""
    found = imports.upward(imports.edges())
    unexpected = {f"{a} -> {b}": where for (a, b), where in found.items()}
    for pair in UPWARD_ALLOWED:
        unexpected.pop(f"{pair[0]} -> {pair[1]}", None)
    assert not unexpected, f"imports up the layers (see docs/architecture.md): {unexpected}"


def test_no_import_loop_between_units() -> None:
    assert imports.loops(imports.edges()) == []


def test_the_graph_sees_an_upward_import_and_a_loop() -> None:
    """The checks themselves: an edge from a lower layer to a higher one is upward, and two
    units that import each other are one loop."""
    graph = {("engine", "gateway"): ["x.py:1"], ("gateway", "engine"): ["y.py:2"]}
    assert list(imports.upward(graph)) == [("engine", "gateway")]
    assert imports.loops(graph) == [["engine", "gateway"]]


def test_the_graph_skips_type_checking_imports_and_reads_lazy_ones() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from vllmd.gateway import app\n"
        "def f():\n    from vllmd.engine.api import EngineAPI\n"
        "from . import sibling\n"
        "import importlib\nimportlib.import_module('vllmd.control.api')\n"
    )
    found = sorted(m for m, _ in imports._imports(ast.parse(source), "vllmd.store.db", False))
    assert found == [
        "importlib",
        "typing.TYPE_CHECKING",
        "vllmd.control.api",
        "vllmd.engine.api",
        "vllmd.store.sibling",
    ]
