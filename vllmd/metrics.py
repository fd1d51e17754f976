"""vllmd's own Prometheus metrics (prefix `vllmd_`, base units).

Counters and histograms are updated on the hot path through label children cached once per
label set; everything that is state (model states, in-flight, queue depth) is read at scrape
time by a collector, so nothing has to remember to update it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vllmd import __version__
from vllmd.instance.states import InstanceState

if TYPE_CHECKING:
    from vllmd.events import Event, EventBus
    from vllmd.instance.status import ModelStatus

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Gauge("vllmd_build_info", "vllmd build.", ["version"], registry=r).labels(__version__).set(
            1
        )
        self._requests = Counter(
            "vllmd_requests",
            "Gateway requests by model, route and status code.",
            ["model", "endpoint", "code"],
            registry=r,
        )
        self._duration = Histogram(
            "vllmd_request_duration_seconds",
            "Gateway request duration, queue included.",
            ["model", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._queue = Histogram(
            "vllmd_request_queue_seconds",
            "Time requests waited for their model to be ready.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._ttfb = Histogram(
            "vllmd_time_to_first_byte_seconds",
            "Engine time to first byte, queue excluded.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._rejected = Counter(
            "vllmd_requests_rejected",
            "Requests refused before reaching an engine.",
            ["model", "reason"],
            registry=r,
        )
        self.loads = Counter(
            "vllmd_model_loads", "Engine starts by result.", ["model", "result"], registry=r
        )
        self.load_duration = Histogram(
            "vllmd_model_load_duration_seconds",
            "Seconds from spawn to ready.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "vllmd_model_restarts", "Engine restarts by reason.", ["model", "reason"], registry=r
        )
        self.evictions = Counter(
            "vllmd_model_evictions",
            "Evictions by reason and action.",
            ["model", "reason", "action"],
            registry=r,
        )
        # Label children cached per label set, so the hot path skips prometheus_client's
        # labels() (lock, tuple checks). The caller keeps every label in a closed set (model
        # names or "", route templates or "other", status codes, DESIGN's reasons), which
        # bounds these caches and the series alike.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._queue_children: dict[str, Histogram] = {}
        self._ttfb_children: dict[str, Histogram] = {}
        self._rejected_children: dict[tuple[str, str], Counter] = {}

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

    def watch(self, statuses: Callable[[], Iterable[ModelStatus]]) -> None:
        """Read the models' state at scrape time through `statuses`."""
        self.registry.register(_StatusCollector(statuses))

    def count_events(self, bus: EventBus) -> None:
        """Count loads, restarts and evictions where they are told (a synchronous subscriber:
        cheap, never misses one), so no code path that starts, restarts or evicts an engine
        can forget to count it."""
        bus.on_event(self._on_event)

    def _on_event(self, event: Event) -> None:
        model = event.model or ""
        fields = event.fields
        if event.kind == "state":
            if fields.get("new") == "ready" and fields.get("old") == "starting":
                self.loads.labels(model, "ok").inc()
                seconds = fields.get("load_seconds")
                if isinstance(seconds, int | float):
                    self.load_duration.labels(model).observe(seconds)
            elif fields.get("new") == "starting" and "restart_reason" in fields:
                self.restarts.labels(model, str(fields["restart_reason"])).inc()
        elif event.kind == "start_failed":
            self.loads.labels(model, str(fields.get("result", "failed"))).inc()
        elif event.kind == "evicted":
            self.evictions.labels(model, str(fields["reason"]), str(fields["action"])).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StatusCollector(Collector):
    """Model state read at scrape time."""

    def __init__(self, statuses: Callable[[], Iterable[ModelStatus]]) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "vllmd_model_state", "1 for the state the model is in.", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily(
            "vllmd_model_in_flight_requests", "Requests being served.", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "vllmd_model_queue_depth", "Requests waiting for the model.", labels=["model"]
        )
        reserved = GaugeMetricFamily(
            "vllmd_model_reserved_bytes", "Memory reserved per device.", labels=["model", "device"]
        )
        used = GaugeMetricFamily(
            "vllmd_model_memory_used_bytes",
            "Memory measured in use per device after the last start.",
            labels=["model", "device"],
        )
        last_used = GaugeMetricFamily(
            "vllmd_model_last_used_timestamp_seconds",
            "When a request last ended.",
            labels=["model"],
        )
        for st in self._statuses():
            for s in InstanceState:
                state.add_metric([st.name, s.value], 1.0 if st.state is s else 0.0)
            in_flight.add_metric([st.name], st.in_flight)
            queue.add_metric([st.name], st.queue_depth)
            for device in st.model.devices:
                reserved.add_metric([st.name, device], st.held_bytes)
                if st.measured_bytes:
                    used.add_metric([st.name, device], st.measured_bytes)
            if st.last_used is not None:
                last_used.add_metric([st.name], st.last_used)
        yield from (state, in_flight, queue, reserved, used, last_used)
