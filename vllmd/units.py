"""Sizes and durations as operators write them in the config: "20GiB", "512MB", "1h30m"."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

SIZE_EXAMPLES = '(e.g. "20GiB", "20GB")'
DURATION_EXAMPLES = '(e.g. "90s", "1h30m")'

# Units are matched case-insensitively ("gb", "GB", "GiB"): nobody means bits in a memory size.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")

# Go's time.ParseDuration units, in seconds.
_DURATION_UNITS = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),  # micro sign
    "μs": Decimal("1e-6"),  # greek mu
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),  # beyond Go: retention periods ("30d")
}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")

_IEC = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def parse_size(text: str | int) -> int:
    """Bytes in `text` ("20GiB", "20GB", "512MiB", "1.5GiB", "1024"); an int is bytes already.

    Fractions of a byte are dropped. Raises ValueError naming the text on anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text} is not a size: it is negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a size {SIZE_EXAMPLES}")
    match = _SIZE_RE.fullmatch(text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f'"{text}" is not a size {SIZE_EXAMPLES}')
    return int(Decimal(match.group(1)) * unit)


def parse_duration(text: str) -> float:
    """Seconds in a Go-syntax duration ("90s", "1h30m", "500ms", "1.5h"; "0" alone is allowed),
    plus days ("30d").

    Raises ValueError naming the text on anything else, including negative durations.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration {DURATION_EXAMPLES}")
    if text == "0":
        return 0.0
    total = Decimal(0)
    pos = 0
    while pos < len(text):
        part = _DURATION_PART_RE.match(text, pos)
        if part is None:
            raise ValueError(f'"{text}" is not a duration {DURATION_EXAMPLES}')
        try:
            total += Decimal(part.group(1)) * _DURATION_UNITS[part.group(2)]
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
            raise ValueError(f'"{text}" is not a duration {DURATION_EXAMPLES}') from exc
        pos = part.end()
    if pos == 0:
        raise ValueError(f'"{text}" is not a duration {DURATION_EXAMPLES}')
    return float(total)


def format_size(n: int) -> str:
    """`n` bytes for humans, in the largest IEC unit it reaches: 3221225472 -> "3.0GiB"."""
    sign = "-" if n < 0 else ""
    magnitude = abs(n)
    for name, factor in _IEC:
        if magnitude >= factor:
            return f"{sign}{magnitude / factor:.1f}{name}"
    return f"{sign}{magnitude}B"


def format_duration(seconds: float) -> str:
    """`seconds` in Go syntax that `parse_duration` reads back: 5400 -> "1h30m", 0.5 -> "500ms"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs = round(secs, 3)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    if secs or not parts:
        parts.append(f"{secs:g}s")
    return "".join(parts)
