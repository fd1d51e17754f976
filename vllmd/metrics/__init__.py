"""vllmd's own Prometheus metrics (prefix `vllmd_`, base units), on a private registry.

Counters and histograms are updated on the hot path through label children cached once per
label set; everything that is state (model states, memory, devices, in-flight, queue depth,
dropped events) is read at scrape time by collectors (collector.py), so nothing has to
remember to update it. Other parts register their own collectors with `Metrics.registry`
(the alert engine: `vllmd_alerts`, `vllmd_alert_notifications_total`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

from vllmd import __version__
from vllmd.events import Kind
from vllmd.metrics.collector import DroppedCollector, StateCollector, StoreCollector, Watched
from vllmd.metrics.exposition import CONTENT_TYPE, render_families
from vllmd.metrics.hot import (
    CounterChild,
    HistogramChild,
    HotCollector,
    HotCounter,
    HotHistogram,
    TextCollector,
)
from vllmd.metrics.lag import run_lag_monitor

if TYPE_CHECKING:
    from vllmd.devices import DeviceSnapshot
    from vllmd.events import Event, EventBus
    from vllmd.instance.status import ModelStatus
    from vllmd.placement.ledger import DeviceAccount

__all__ = ["Metrics", "Watched", "run_lag_monitor"]

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        Gauge("vllmd_build_info", "vllmd build.", ["version"], registry=r).labels(__version__).set(
            1
        )
        self._loop_lag = Gauge(
            "vllmd_event_loop_lag_seconds",
            "How late the daemon's event loop ran its last lag timer.",
            registry=r,
        )
        self._reload_ok = Gauge(
            "vllmd_config_last_reload_successful",
            "1 when the last reload succeeded (or none was tried), 0 when it was refused.",
            registry=r,
        )
        self._reload_ok.set(1)
        self._engine_versions: dict[str, str] = {}
        self._requests = HotCounter(
            "vllmd_requests",
            "Gateway requests by model, route and status code.",
            ["model", "endpoint", "code"],
        )
        self._duration = HotHistogram(
            "vllmd_request_duration_seconds",
            "Gateway request duration, queue included.",
            ["model", "endpoint"],
            REQUEST_BUCKETS,
        )
        self._queue = HotHistogram(
            "vllmd_request_queue_seconds",
            "Time requests waited for their model to be ready.",
            ["model"],
            REQUEST_BUCKETS,
        )
        self._ttfb = HotHistogram(
            "vllmd_time_to_first_byte_seconds",
            "Engine time to first byte, queue excluded.",
            ["model"],
            REQUEST_BUCKETS,
        )
        self._rejected = HotCounter(
            "vllmd_requests_rejected",
            "Requests refused before reaching an engine.",
            ["model", "reason"],
        )
        self.loads = HotCounter(
            "vllmd_model_loads", "Engine starts by result.", ["model", "result"]
        )
        self.load_duration = HotHistogram(
            "vllmd_model_load_duration_seconds",
            "Seconds from spawn to ready.",
            ["model"],
            LOAD_BUCKETS,
        )
        self.wake_duration = HotHistogram(
            "vllmd_model_wake_duration_seconds",
            "Seconds from waking to ready.",
            ["model"],
            LOAD_BUCKETS,
        )
        self.restarts = HotCounter(
            "vllmd_model_restarts", "Engine restarts by reason.", ["model", "reason"]
        )
        self.evictions = HotCounter(
            "vllmd_model_evictions",
            "Evictions by reason and action.",
            ["model", "reason", "action"],
        )
        self._notifications = HotCounter(
            "vllmd_alert_notifications",
            "Alert notifications sent, by receiver (scheme://host:port) and result.",
            ["receiver", "result"],
        )
        hot = HotCollector(
            [
                self._notifications,
                self._requests,
                self._duration,
                self._queue,
                self._ttfb,
                self._rejected,
                self.loads,
                self.load_duration,
                self.wake_duration,
                self.restarts,
                self.evictions,
            ]
        )
        self._text: list[TextCollector] = [hot]
        r.register(hot)
        # Label children cached per label set, so the hot path skips prometheus_client's
        # labels() (lock, tuple checks). The caller keeps every label in a closed set (model
        # names or "", route templates or "other", status codes, docs/design.md's reasons), which
        # bounds these caches and the series alike.
        self._children: dict[tuple[str, str, int], tuple[CounterChild, HistogramChild]] = {}
        self._queue_children: dict[str, HistogramChild] = {}
        self._ttfb_children: dict[str, HistogramChild] = {}
        self._rejected_children: dict[tuple[str, str], CounterChild] = {}

    def reload_result(self, *, ok: bool) -> None:
        self._reload_ok.set(1 if ok else 0)

    def alert_notification(self, receiver: str, result: str) -> None:
        """One notification to `receiver` (ok or error)."""
        self._notifications.labels(receiver, result).inc()

    # --- the hot path --------------------------------------------------------------------------

    def request(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        """One gateway request; `endpoint` is a route template or "other", never a raw path."""
        key = (model, endpoint, code)
        pair = self._children.get(key)
        if pair is None:
            pair = (
                self._requests.labels(model, endpoint, str(code)),
                self._duration.labels(model, endpoint),
            )
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def queued(self, model: str, seconds: float) -> None:
        child = self._queue_children.get(model)
        if child is None:
            child = self._queue_children[model] = self._queue.labels(model)
        child.observe(seconds)

    def first_byte(self, model: str, seconds: float) -> None:
        child = self._ttfb_children.get(model)
        if child is None:
            child = self._ttfb_children[model] = self._ttfb.labels(model)
        child.observe(seconds)

    def rejected(self, model: str, reason: str) -> None:
        key = (model, reason)
        child = self._rejected_children.get(key)
        if child is None:
            child = self._rejected_children[key] = self._rejected.labels(model, reason)
        child.inc()

    # --- what others tell ----------------------------------------------------------------------

    def loop_lag(self, seconds: float) -> None:
        """The event loop's latest lag (`run_lag_monitor` measures it)."""
        self._loop_lag.set(seconds)

    def engine_version(self, model: str, version: str) -> None:
        """The version of the engine `model` runs, once known (`vllmd_model_info`)."""
        self._engine_versions[model] = version

    # --- what is read at scrape time -----------------------------------------------------------

    def watch(self, watched: Watched | Callable[[], Iterable[ModelStatus]]) -> None:
        """Read models and devices at scrape time from `watched` (the supervisor). A bare
        statuses reader (the form before device series) gives the model series only."""
        if callable(watched):
            watched = _ModelsOnly(watched)
        self._register(StateCollector(watched, self._version_of))

    def count_events(self, bus: EventBus) -> None:
        """Count loads, restarts, evictions and wakes where they are told (a synchronous
        subscriber: cheap, never misses one), so no code path that starts, restarts, wakes
        or evicts an engine can forget to count it; and read the bus's dropped events."""
        bus.on_event(self._on_event)
        self._register(DroppedCollector(lambda: bus.dropped))

    def watch_store(self, degraded: Callable[[], bool]) -> None:
        """`vllmd_state_store_degraded`, read from the state store at scrape time."""
        self._register(StoreCollector(degraded))

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every series (no `_created` ones) and its content type."""
        # vllmd's own families write their text themselves (fast); the registry's other
        # collectors (process, whatever others registered) go through the generic writer.
        with ExitStack() as stack:
            for each in self._text:
                stack.enter_context(each.muted())
            rest = render_families(self.registry.collect())
        own = "".join(each.render() for each in self._text)
        return (rest + own).encode(), CONTENT_TYPE

    def _register(self, collector: TextCollector) -> None:
        self.registry.register(collector)
        self._text.append(collector)

    def _version_of(self, model: str) -> str:
        return self._engine_versions.get(model, "")

    def _on_event(self, event: Event) -> None:
        model = event.model or ""
        fields = event.fields
        if event.kind is Kind.STATE:
            old, new = fields.get("old"), fields.get("new")
            if new == "ready" and old == "starting":
                self.loads.labels(model, "ok").inc()
                if isinstance(version := fields.get("engine_version"), str):
                    self.engine_version(model, version)
                seconds = fields.get("load_seconds")
                if isinstance(seconds, int | float):
                    self.load_duration.labels(model).observe(seconds)
            elif new == "ready" and old == "waking":
                seconds = fields.get("wake_seconds")
                if isinstance(seconds, int | float):
                    self.wake_duration.labels(model).observe(seconds)
            elif new == "starting" and "restart_reason" in fields:
                self.restarts.labels(model, str(fields["restart_reason"])).inc()
        elif event.kind is Kind.START_FAILED:
            self.loads.labels(model, str(fields.get("result", "failed"))).inc()
        elif event.kind is Kind.EVICTED:
            self.evictions.labels(model, str(fields["reason"]), str(fields["action"])).inc()


class _ModelsOnly:
    """A statuses reader as a `Watched` without devices."""

    def __init__(self, statuses: Callable[[], Iterable[ModelStatus]]) -> None:
        self.statuses = statuses

    def accounts(self) -> Sequence[DeviceAccount]:
        return ()

    def devices(self) -> Mapping[str, DeviceSnapshot]:
        return {}
