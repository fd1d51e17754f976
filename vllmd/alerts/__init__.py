"""Threshold alerts (docs/design.md "Alerts"): signals -> rules -> notifications."""

from vllmd.alerts.engine import AlertEngine, AlertsCollector
from vllmd.alerts.notify import Notifier
from vllmd.alerts.rules import Alert, AlertState, Evaluator
from vllmd.alerts.signals import Observations, Signals

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertState",
    "AlertsCollector",
    "Evaluator",
    "Notifier",
    "Observations",
    "Signals",
]
