"""One `vllmctl doctor` check and the report of them all."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True, slots=True)
class Check:
    status: Status
    name: str
    detail: str
    fix: str = ""
    more: tuple[str, ...] = ()  # further lines of detail (each config problem)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status}  {check.name}: {check.detail}")
        lines += [f"        {line}" for line in check.more]
        if check.fix and check.status != "PASS":
            lines.append(f"      fix: {check.fix}")
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    lines.append(f"{failed} failed, {warned} warnings, {len(checks) - failed - warned} passed")
    return "\n".join(lines)


def failed(checks: list[Check]) -> bool:
    return any(c.status == "FAIL" for c in checks)
