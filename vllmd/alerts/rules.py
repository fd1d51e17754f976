"""Alert rules evaluated like Prometheus's: a pure state machine over signal values.

For every rule and every label set its signal has a value for (one per model or device):

    inactive --condition holds--> PENDING --held for `for`--> FIRING --stops holding--> RESOLVED
    PENDING --stops holding--> (gone: a blip shorter than `for` never fires)
    RESOLVED --kept RESOLVED_RETENTION, so receivers hear of it again--> (gone)

A label set without a value (a model removed, too few requests for an error ratio) does not
hold. `Evaluator.evaluate` is given the time, so tests step through it without sleeping.
"""

from __future__ import annotations

import functools
import operator
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType

from vllmd.config.schema import AlertRule

# One label set of a signal: (("model", "qwen"),), (("device", "0"),), or () for the host.
LabelSet = tuple[tuple[str, str], ...]
# Per rule name, the value of its signal per label set (what `signals.py` computes).
Values = Mapping[str, Mapping[LabelSet, float]]

RESOLVED_RETENTION = 15 * 60.0  # resolved alerts are re-sent this long (like Prometheus)

OPERATORS: Mapping[str, Callable[[float, float], bool]] = MappingProxyType(
    {
        ">": operator.gt,
        ">=": operator.ge,
        "<": operator.lt,
        "<=": operator.le,
        "==": operator.eq,
        "!=": operator.ne,
    }
)


class AlertState(StrEnum):
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert of one rule for one label set, as of the last evaluation (times: unix s)."""

    name: str  # the rule's name: the alertname label
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    state: AlertState
    value: float  # the signal's latest value that held (the last one, once resolved)
    active_at: float  # when the condition began to hold
    fired_at: float | None = None  # when it began firing: Alertmanager's startsAt
    resolved_at: float | None = None

    @property
    def fingerprint(self) -> str:
        """Alertmanager's fingerprint of the labels (FNV-1a 64 over sorted names and values)."""
        return fingerprint(self.labels)


def fingerprint(labels: Mapping[str, str]) -> str:
    h = 0xCBF29CE484222325
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode():
                h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
            h = ((h ^ 0xFF) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


_TEMPLATE = re.compile(r"\{\{\s*\$(?:labels\.([A-Za-z_][A-Za-z0-9_]*)|(value))\s*\}\}")


def render(text: str, labels: Mapping[str, str], value: float) -> str:
    """The two template forms of Prometheus annotations most rules use:
    `{{ $labels.model }}` and `{{ $value }}` (anything else is left as written)."""

    def sub(match: re.Match[str]) -> str:
        if match.group(2):
            return f"{value:g}"
        return labels.get(match.group(1), "")

    return _TEMPLATE.sub(sub, text)


def alert_labels(
    rule: AlertRule, series: LabelSet, common: Mapping[str, str], host: str
) -> dict[str, str]:
    """An alert's labels; later wins: host, `[alerts] labels`, the series' own (model or
    device), severity, the rule's labels, alertname."""
    labels = {"host": host, **common, **dict(series), "severity": rule.severity}
    labels.update(rule.labels)
    labels["alertname"] = rule.name
    return labels


def _selected(rule: AlertRule, series: LabelSet) -> bool:
    own = dict(series)
    if rule.model and own.get("model") != rule.model:
        return False
    return not (rule.device and own.get("device") != rule.device)


@functools.cache
def this_host() -> str:
    """This host's name in alerts (label `host`, generatorURL), cached: a reverse DNS lookup
    (seconds where DNS is broken), so the alert engine makes it in a thread
    once the daemon is READY, before its first evaluation."""
    return socket.getfqdn()


class Evaluator:
    """The state of every rule's alerts between evaluations (keyed by their full label set,
    as Prometheus does: an alert whose labels change is a new alert). `host`: None for
    `this_host()`."""

    def __init__(self, host: str | None = None) -> None:
        self._host = host
        self._alerts: dict[tuple[tuple[str, str], ...], Alert] = {}

    def evaluate(
        self,
        rules: Sequence[AlertRule],
        values: Values,
        now: float,
        common: Mapping[str, str] | None = None,
    ) -> list[Alert]:
        """One evaluation at `now`: every alert pending, firing or recently resolved."""
        seen: set[tuple[tuple[str, str], ...]] = set()
        for rule in rules:
            holds = OPERATORS[rule.op]
            for series, value in values.get(rule.name, {}).items():
                if not _selected(rule, series) or not holds(value, rule.threshold):
                    continue
                labels = alert_labels(rule, series, common or {}, self._host or this_host())
                key = tuple(sorted(labels.items()))
                seen.add(key)
                annotations = {k: render(v, labels, value) for k, v in rule.annotations.items()}
                old = self._alerts.get(key)
                if old is None or old.state is AlertState.RESOLVED:
                    # inactive -> PENDING (a resolved one that holds again starts over)
                    alert = Alert(rule.name, labels, annotations, AlertState.PENDING, value, now)
                else:
                    alert = replace(old, value=value, annotations=annotations)
                if alert.state is AlertState.PENDING and now - alert.active_at >= rule.for_:
                    alert = replace(alert, state=AlertState.FIRING, fired_at=now)  # -> FIRING
                self._alerts[key] = alert
        for key, alert in list(self._alerts.items()):
            if key in seen:
                continue
            if alert.state is AlertState.PENDING:
                del self._alerts[key]  # PENDING -> gone: it never held long enough
            elif alert.state is AlertState.FIRING:
                self._alerts[key] = replace(alert, state=AlertState.RESOLVED, resolved_at=now)
            elif alert.resolved_at is not None and now - alert.resolved_at >= RESOLVED_RETENTION:
                del self._alerts[key]  # RESOLVED -> gone
        return list(self._alerts.values())
