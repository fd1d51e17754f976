"""Property-based fuzzing of the daemon's two HTTP surfaces (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def weighted(draw: st.DrawFn, *choices: tuple[int, Any]) -> Any:
    """One of `choices` (weight, value), drawn so that shrinking goes to the first."""
    total = sum(weight for weight, _ in choices)
    pick = draw(st.integers(0, total - 1))
    for weight, value in choices:
        if pick < weight:
            return value
        pick -= weight
    raise AssertionError("unreachable")
