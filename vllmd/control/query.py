"""Reading a control request's method and query: each bad value a clear `bad_request`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vllmd.control.errors import ControlError

# The event log's ids are SQLite INTEGERs: signed 64-bit, so no id lies beyond this.
MAX_EVENT_ID = 2**63 - 1
_WHOLE = re.compile(r"-?[0-9]+")  # ASCII digits only: int() takes more (other scripts, "1_0")


def allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise ControlError("method_not_allowed", f"{method} is not allowed here: use {allowed}")


def flag(query: dict[str, str], key: str) -> bool:
    return bool_param(query, key, default=False)


def bool_param(query: dict[str, str], key: str, *, default: bool) -> bool:
    raw = query.get(key)
    if raw is None or raw == "":
        return default
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(
        raw.lower()
    )
    if value is None:
        raise ControlError("bad_request", f"{key}={raw!r} is neither true nor false")
    return value


def int_param(query: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not _WHOLE.fullmatch(raw):
        raise ControlError("bad_request", f"{key}={raw!r} is not a whole number")
    # The length first: int() of thousands of digits is an error of its own.
    value = int(raw) if len(raw.lstrip("-0")) <= 30 else None
    if value is None or not low <= value <= high:
        raise ControlError("bad_request", f"{key} must be between {low} and {high}")
    return value


def float_param(query: dict[str, str], key: str, default: float) -> float:
    raw = query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ControlError("bad_request", f"{key}={raw!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise ControlError("bad_request", f"{key} must be between 0 and 86400 seconds")
    return value


@dataclass(frozen=True, slots=True)
class Since:
    """What `since=` asks for: events after an id, or from a time (unix s) on; neither: all."""

    after_id: int | None = None
    from_time: float | None = None

    def keeps(self, event: Mapping[str, Any]) -> bool:
        if self.after_id is not None:
            return bool(event["id"] > self.after_id)
        return self.from_time is None or bool(event["time"] >= self.from_time)


def parse_since(raw: str | None) -> Since:
    """`since=`: an event id, or an RFC 3339 time with its zone."""
    if raw is None:
        return Since()
    if raw.isascii() and raw.isdecimal():
        # The length first: int() of thousands of digits is an error of its own.
        if len(raw.lstrip("0")) > len(str(MAX_EVENT_ID)) or int(raw) > MAX_EVENT_ID:
            raise ControlError(
                "bad_request", f"since is beyond the largest event id ({MAX_EVENT_ID})"
            )
        return Since(after_id=int(raw))
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ControlError(
            "bad_request", f"since={raw!r} is neither an event id nor an RFC 3339 time"
        ) from None
    if moment.tzinfo is None:
        raise ControlError("bad_request", f"since={raw!r} needs a time zone (e.g. Z)")
    return Since(from_time=moment.timestamp())
