"""Ownership rules of DESIGN's layout, checked over vllmd/'s syntax trees: nobody writes
another object's attributes (the owner changes its state; others call it or read a frozen
view), and no module grows past what one owner can hold."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vllmd"
MAX_LINES = 400

# Attribute writes whose target is not `self`/`cls`, each a real exception:
ALLOWED: dict[str, set[str]] = {
    # The `tokenizers` library assembles a tokenizer by attribute: that is its API.
    "vllmd/demo_models.py": {"tokenizer.pre_tokenizer", "tokenizer.decoder"},
}


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
