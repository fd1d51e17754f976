"""The alert engine: evaluate the rules every `alerts.interval`, hand the result to the
notifier, and show it (`GET /v1/alerts`, status's `alerts_firing`, `vllmd_alerts`).

    AlertEngine.run
    └── task group
        ├── Notifier.run (one task per receiver: a slow one never delays an evaluation)
        └── evaluate, sleep(interval), evaluate, ...

The config is read through `config()` at every evaluation, so a reload's rules, labels and
receivers take effect at the next one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from vllmd.alerts.notify import Notifier, rfc3339
from vllmd.alerts.rules import Alert, AlertState, Evaluator, this_host
from vllmd.alerts.signals import Signals
from vllmd.config.schema import Config
from vllmd.events import EventBus, Kind

log = structlog.get_logger("vllmd.alerts")

ACTIVE = (AlertState.PENDING, AlertState.FIRING)


class AlertEngine:
    def __init__(
        self,
        config: Callable[[], Config],
        signals: Signals,
        notifier: Notifier,
        *,
        clock: Callable[[], float] = time.time,  # wall time: alerts carry timestamps
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        host: str | None = None,
        events: EventBus | None = None,  # alert transitions go to the event log
    ) -> None:
        self._events = events
        self._config = config
        self._signals = signals
        self._notifier = notifier
        self._clock = clock
        self._sleep = sleep
        self._evaluator = Evaluator(host)
        self._host = host
        self._alerts: list[Alert] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Evaluate every `alerts.interval` until cancelled; started once the notifier runs."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._notifier.run)
            task_status.started()
            if self._host is None:
                # The reverse DNS lookup this_host() caches, in a thread: seconds where DNS is
                # broken, which must stall neither start-up nor the gateway's loop.
                await anyio.to_thread.run_sync(this_host)
            while True:
                try:
                    self.evaluate()
                except Exception:
                    # Alerting is how operators hear about trouble: one bad evaluation (a
                    # bug reading a signal) is logged and the next one tried, never fatal.
                    log.exception("alert_evaluation_failed")
                await self._sleep(self._config().alerts.interval)

    def evaluate(self) -> list[Alert]:
        """One evaluation now: the alerts, also handed to the notifier."""
        config = self._config()
        rules = config.alerts.rules if config.alerts.enabled else ()
        values = self._signals.read(rules)
        now = self._clock()
        alerts = self._evaluator.evaluate(rules, values, now, config.alerts.labels)
        before = {a.fingerprint: a.state for a in self._alerts}
        for alert in alerts:
            if alert.state is not before.get(alert.fingerprint):
                self._told(alert)
        self._alerts = alerts
        self._notifier.offer(alerts, now)
        return alerts

    def _told(self, alert: Alert) -> None:
        fields = {
            "alertname": alert.name,
            "alertstate": str(alert.state),
            "labels": dict(alert.labels),
            "value": alert.value,
        }
        if self._events is None:
            log.info("alert", **fields)
        else:
            self._events.emit(Kind.ALERT, alert.labels.get("model"), **fields)

    def alerts(self) -> list[Alert]:
        """Every alert of the last evaluation, resolved ones still kept included."""
        return list(self._alerts)

    def active(self) -> list[dict[str, Any]]:
        """The pending and firing alerts as JSON (`GET /v1/alerts`), firing first."""
        shown = [a for a in self._alerts if a.state in ACTIVE]
        shown.sort(key=lambda a: (a.state is not AlertState.FIRING, a.name, a.fingerprint))
        return [as_json(a) for a in shown]

    def firing_count(self) -> int:
        return sum(1 for a in self._alerts if a.state is AlertState.FIRING)


def as_json(alert: Alert) -> dict[str, Any]:
    return {
        "name": alert.name,
        "state": str(alert.state),
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "value": alert.value,
        "activeAt": rfc3339(alert.active_at),
        "startsAt": rfc3339(alert.fired_at) if alert.fired_at is not None else None,
        "fingerprint": alert.fingerprint,
    }


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class AlertsCollector(Collector):
    """`vllmd_alerts`: 1 per pending or firing alert, with every label of the alert plus
    `alertstate` (Prometheus's ALERTS), read at scrape time."""

    def __init__(self, engine: AlertEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        family = Metric("vllmd_alerts", "Pending and firing alerts (like ALERTS).", "gauge")
        for alert in self._engine.alerts():
            if alert.state not in ACTIVE:
                continue
            labels = {k: v for k, v in alert.labels.items() if _LABEL_NAME.fullmatch(k)}
            labels["alertstate"] = str(alert.state)
            family.add_sample("vllmd_alerts", labels, 1.0)
        yield family
