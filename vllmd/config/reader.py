"""Typed reads from one TOML table that collect problems instead of stopping at the first.

Every getter marks its key as known, records a `key.path: message` problem on a bad value and
returns the default, so one pass over the file reports everything that is wrong with it.
`Table.finish()` then reports the keys nobody asked for.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from vllmd.units import DURATION_EXAMPLES, SIZE_EXAMPLES, parse_duration, parse_size

T = TypeVar("T")


def describe(value: Any, *, secret: bool = False) -> str:
    """`value` as a problem message shows it; a secret shows only its type."""
    if isinstance(value, bool):
        kind, shown = "a boolean", "true" if value else "false"
    elif isinstance(value, int):
        kind, shown = "an integer", str(value)
    elif isinstance(value, float):
        kind, shown = "a float", repr(value)
    elif isinstance(value, str):
        kind, shown = "a string", json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        return "a list"
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    else:  # pragma: no cover - tomllib produces nothing else
        return type(value).__name__
    return kind if secret else shown


class Table:
    """One TOML table at `path` ("" for the root, "models.qwen" for a model)."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        """The full key path of `name`, as problem messages show it."""
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def has(self, name: str) -> bool:
        self._seen.add(name)
        return name in self.data

    def require(self, name: str) -> bool:
        """True if `name` is set; otherwise records it as missing."""
        if self.has(name):
            return True
        self.problem(name, "missing (required)")
        return False

    def read(
        self,
        name: str,
        default: T,
        convert: Callable[[Any], T],
        expected: str,
        *,
        secret: bool = False,
    ) -> T:
        """`convert(value)`; a TypeError means the wrong type, a ValueError a bad value."""
        if not self.has(name):
            return default
        value = self.data[name]
        try:
            return convert(value)
        except TypeError:
            self.problem(name, f"expected {expected}, got {describe(value, secret=secret)}")
        except ValueError as exc:
            self.problem(name, str(exc))
        return default

    def text(self, name: str, default: str, *, secret: bool = False) -> str:
        return self.read(name, default, _as_str, "a string", secret=secret)

    def flag(self, name: str, default: bool) -> bool:
        return self.read(name, default, _as_bool, "true or false")

    def integer(self, name: str, default: int, *, minimum: int | None = None) -> int:
        def convert(value: Any) -> int:
            number = _as_int(value)
            if minimum is not None and number < minimum:
                raise ValueError(f"must be at least {minimum}, got {number}")
            return number

        return self.read(name, default, convert, "an integer")

    def number(self, name: str, default: float) -> float:
        return self.read(name, default, _as_float, "a number")

    def size(self, name: str, default: int) -> int:
        def convert(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError
            return parse_size(value)

        return self.read(name, default, convert, f"a size {SIZE_EXAMPLES}")

    def duration(self, name: str, default: float) -> float:
        def convert(value: Any) -> float:
            return parse_duration(_as_str(value))

        return self.read(name, default, convert, f"a duration string {DURATION_EXAMPLES}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(value: Any) -> str:
            chosen = _as_str(value)
            if chosen not in choices:
                listed = ", ".join(json.dumps(c) for c in choices)
                raise ValueError(f"{json.dumps(chosen)} is not one of {listed}")
            return chosen

        return self.read(name, default, convert, "a string")

    def strings(
        self, name: str, default: tuple[str, ...] = (), *, secret: bool = False
    ) -> tuple[str, ...]:
        if not self.has(name):
            return default
        value = self.data[name]
        if not isinstance(value, list):
            self.problem(name, f"expected a list of strings, got {describe(value, secret=secret)}")
            return default
        bad = [i for i, item in enumerate(value) if not isinstance(item, str)]
        for i in bad:
            shown = describe(value[i], secret=secret)
            self.problems.append(f"{self.key(name)}[{i}]: expected a string, got {shown}")
        return default if bad else tuple(value)

    def mapping(self, name: str, *, secret: bool = False) -> Mapping[str, str]:
        """A table of strings (env, labels); `secret` keeps values out of messages."""
        table = self.table(name)
        if table is None:
            return MappingProxyType({})
        result: dict[str, str] = {}
        for key, value in table.data.items():
            if isinstance(value, str):
                result[key] = value
            else:
                table.problem(key, f"expected a string, got {describe(value, secret=secret)}")
        return MappingProxyType(result)

    def table(self, name: str) -> Table | None:
        """The sub-table `name`, or None when absent or not a table (recorded)."""
        if not self.has(name):
            return None
        value = self.data[name]
        if not isinstance(value, dict):
            self.problem(name, f"expected a table, got {describe(value)}")
            return None
        return Table(value, self.key(name), self.problems)

    def finish(self) -> None:
        """Record every key that no getter asked for, suggesting the closest known one."""
        for name in self.data:
            if name in self._seen:
                continue
            import difflib  # for a config with a mistake only: not in every start

            close = difflib.get_close_matches(name, sorted(self._seen), n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            self.problem(name, f"unknown key{hint}")


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError
    return float(value)
