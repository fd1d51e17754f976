"""Reading a control request's method and query: each bad value a clear `bad_request`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from vllmd.events import Event
from vllmd.http.control_errors import ControlError


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
    try:
        value = int(raw)
    except ValueError:
        raise ControlError("bad_request", f"{key}={raw!r} is not a whole number") from None
    if not low <= value <= high:
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


def since_filter(raw: str | None) -> Callable[[Event], bool]:
    """Which events `since=` asks for: after an event id, or from an RFC 3339 time on."""
    if raw is None:
        return lambda e: True
    if raw.isascii() and raw.isdecimal():
        after = int(raw)
        return lambda e: e.id > after
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ControlError(
            "bad_request", f"since={raw!r} is neither an event id nor an RFC 3339 time"
        ) from None
    if moment.tzinfo is None:
        raise ControlError("bad_request", f"since={raw!r} needs a time zone (e.g. Z)")
    start = moment.timestamp()
    return lambda e: e.time >= start
