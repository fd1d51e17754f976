"""Counters fed from the event bus: loads, restarts and evictions are counted where they are
told (one synchronous subscriber), not where they happen, so no code path that starts,
restarts or evicts an engine can forget to count it."""

from __future__ import annotations

from vllmd.events import Event, EventBus
from vllmd.metrics import Metrics


def count_events(bus: EventBus, metrics: Metrics) -> None:
    """Subscribe `metrics`' counters to `bus` (synchronously: cheap, never misses one)."""

    def on_event(event: Event) -> None:
        model = event.model or ""
        fields = event.fields
        if event.kind == "state":
            if fields.get("new") == "ready" and fields.get("old") == "starting":
                metrics.loads.labels(model, "ok").inc()
                seconds = fields.get("load_seconds")
                if isinstance(seconds, int | float):
                    metrics.load_duration.labels(model).observe(seconds)
            elif fields.get("new") == "starting" and "restart_reason" in fields:
                metrics.restarts.labels(model, str(fields["restart_reason"])).inc()
        elif event.kind == "start_failed":
            metrics.loads.labels(model, str(fields.get("result", "failed"))).inc()
        elif event.kind == "evicted":
            metrics.evictions.labels(model, str(fields["reason"]), str(fields["action"])).inc()

    bus.on_event(on_event)
