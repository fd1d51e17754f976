"""vllmd's /metrics for a known state: every family's presence, type, labels and values, on a
fresh registry per test, with a small fake supervisor."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import fake_config
from vllmd.devices import DeviceSnapshot
from vllmd.events import EventBus, Kind
from vllmd.instance.states import InstanceState
from vllmd.instance.status import ModelStatus
from vllmd.metrics import Metrics, run_lag_monitor
from vllmd.metrics.relay import merge, relay
from vllmd.placement.ledger import DeviceAccount

S = InstanceState
GiB = 1 << 30


class FakeSupervisor:
    def __init__(
        self,
        statuses: Sequence[ModelStatus],
        accounts: Sequence[DeviceAccount] = (),
        devices: Mapping[str, DeviceSnapshot] | None = None,
    ) -> None:
        self._statuses = list(statuses)
        self._accounts = list(accounts)
        self._devices = dict(devices or {})

    def statuses(self) -> list[ModelStatus]:
        return self._statuses

    def accounts(self) -> list[DeviceAccount]:
        return self._accounts

    def devices(self) -> dict[str, DeviceSnapshot]:
        return self._devices


def status(tmp_path: Path, name: str, state: InstanceState, **fields: object) -> ModelStatus:
    model = fake_config(tmp_path, {name: {"devices": ["cpu0"]}}).models[name]
    values: dict[str, object] = {
        "name": name,
        "model": model,
        "state": state,
        "state_since": 1000.0,
        "in_flight": 0,
        "queue_depth": 0,
        "held_bytes": 0,
        "measured_bytes": 0,
        "last_used": None,
        "pid": None,
        "restarts": 0,
        "error": None,
        "load_seconds": None,
        "sleep_level": 0,
    }
    values.update(fields)
    return ModelStatus(**values)  # type: ignore[arg-type]


def gpu(name: str, **fields: object) -> DeviceSnapshot:
    values: dict[str, object] = {
        "name": name,
        "kind": "gpu",
        "uuid": None,
        "index": 0,
        "total": 80 * GiB,
        "used": 10 * GiB,
        "free": 70 * GiB,
        "utilization": 0.5,
        "temperature": 61.0,
        "power": 250.0,
        "processes": (),
        "up": True,
        "error": None,
    }
    values.update(fields)
    return DeviceSnapshot(**values)  # type: ignore[arg-type]


def account(name: str, **fields: object) -> DeviceAccount:
    values: dict[str, object] = {
        "name": name,
        "kind": "gpu",
        "total": 80 * GiB,
        "reserved": 3 * GiB,
        "used": 10 * GiB,
        "free": 60 * GiB,
        "foreign": GiB,
        "up": True,
        "models": {},
    }
    values.update(fields)
    return DeviceAccount(**values)  # type: ignore[arg-type]


def families(metrics: Metrics) -> dict[str, str]:
    """Every family's name and type, as Prometheus parses the exposition."""
    body, _ = metrics.exposition()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def test_models_state_memory_and_info_are_read_at_scrape_time(
    tmp_path: Path, metrics: Metrics
) -> None:
    ready = status(
        tmp_path,
        "a",
        S.READY,
        in_flight=2,
        queue_depth=3,
        held_bytes=3 * GiB,
        measured_bytes=2 * GiB,
        pid=123,
        last_used=1234.5,
    )
    metrics.watch(FakeSupervisor([ready]))
    metrics.engine_version("a", "0.9.1")
    get = metrics.registry.get_sample_value
    assert get("vllmd_model_info", {"model": "a", "engine_version": "0.9.1"}) == 1
    assert get("vllmd_model_state", {"model": "a", "state": "ready"}) == 1
    for other in S:
        if other is not S.READY:
            assert get("vllmd_model_state", {"model": "a", "state": other.value}) == 0
    assert get("vllmd_model_in_flight_requests", {"model": "a"}) == 2
    assert get("vllmd_model_queue_depth", {"model": "a"}) == 3
    assert get("vllmd_model_reserved_bytes", {"model": "a", "device": "cpu0"}) == 3 * GiB
    assert get("vllmd_model_memory_used_bytes", {"model": "a", "device": "cpu0"}) == 2 * GiB
    assert get("vllmd_model_last_used_timestamp_seconds", {"model": "a"}) == 1234.5


def test_engine_version_is_empty_until_known(tmp_path: Path, metrics: Metrics) -> None:
    metrics.watch(FakeSupervisor([status(tmp_path, "a", S.STOPPED)]))
    assert metrics.registry.get_sample_value(
        "vllmd_model_info", {"model": "a", "engine_version": ""}
    )


@pytest.mark.parametrize("state", [S.STOPPED, S.STARTING, S.SLEEPING, S.BACKOFF, S.FAILED])
def test_memory_used_is_absent_without_a_measured_running_engine(
    tmp_path: Path, metrics: Metrics, state: InstanceState
) -> None:
    """The ledger keeps the last start's footprint after the engine is gone: never shown."""
    st = status(tmp_path, "a", state, measured_bytes=2 * GiB, pid=None)
    metrics.watch(FakeSupervisor([st]))
    labels = {"model": "a", "device": "cpu0"}
    assert metrics.registry.get_sample_value("vllmd_model_memory_used_bytes", labels) is None


def test_memory_used_follows_the_status_at_each_scrape(tmp_path: Path, metrics: Metrics) -> None:
    sup = FakeSupervisor([status(tmp_path, "a", S.READY, measured_bytes=GiB, pid=9)])
    metrics.watch(sup)
    labels = {"model": "a", "device": "cpu0"}
    assert metrics.registry.get_sample_value("vllmd_model_memory_used_bytes", labels) == GiB
    sup._statuses = [status(tmp_path, "a", S.STOPPED, measured_bytes=GiB)]
    assert metrics.registry.get_sample_value("vllmd_model_memory_used_bytes", labels) is None


def test_device_series_from_accounts_and_snapshots(metrics: Metrics) -> None:
    sup = FakeSupervisor(
        [],
        accounts=[account("0"), account("cpu0", kind="cpu", used=None, foreign=0, up=True)],
        devices={"0": gpu("0")},
    )
    metrics.watch(sup)
    get = metrics.registry.get_sample_value
    gpu0, cpu0 = {"device": "0"}, {"device": "cpu0"}
    assert get("vllmd_device_memory_total_bytes", gpu0) == 80 * GiB
    assert get("vllmd_device_memory_reserved_bytes", gpu0) == 3 * GiB
    assert get("vllmd_device_memory_used_bytes", gpu0) == 10 * GiB
    assert get("vllmd_device_memory_foreign_bytes", gpu0) == GiB
    assert get("vllmd_device_utilization_ratio", gpu0) == 0.5
    assert get("vllmd_device_temperature_celsius", gpu0) == 61
    assert get("vllmd_device_power_watts", gpu0) == 250
    assert get("vllmd_device_up", gpu0) == 1
    # A declared cpu without a reading exports what is known; the rest is absent, not 0.
    assert get("vllmd_device_memory_total_bytes", cpu0) == 80 * GiB
    assert get("vllmd_device_up", cpu0) == 1
    assert get("vllmd_device_memory_used_bytes", cpu0) is None
    assert get("vllmd_device_utilization_ratio", cpu0) is None
    assert get("vllmd_device_temperature_celsius", cpu0) is None


def test_a_device_that_is_down_reports_up_0(metrics: Metrics) -> None:
    metrics.watch(FakeSupervisor([], accounts=[account("0", up=False)]))
    assert metrics.registry.get_sample_value("vllmd_device_up", {"device": "0"}) == 0


def test_request_recording(metrics: Metrics) -> None:
    get = metrics.registry.get_sample_value
    metrics.request("a", "/v1/chat/completions", 200, 0.3)
    metrics.request("a", "/v1/chat/completions", 200, 0.02)
    metrics.request("", "other", 404, 0.001)
    metrics.queued("a", 0.5)
    metrics.first_byte("a", 0.25)
    metrics.rejected("a", "queue_full")
    route = {"model": "a", "endpoint": "/v1/chat/completions"}
    assert get("vllmd_requests_total", {**route, "code": "200"}) == 2
    assert get("vllmd_requests_total", {"model": "", "endpoint": "other", "code": "404"}) == 1
    assert get("vllmd_request_duration_seconds_count", route) == 2
    assert get("vllmd_request_duration_seconds_sum", route) == pytest.approx(0.32)
    assert get("vllmd_request_duration_seconds_bucket", {**route, "le": "0.025"}) == 1
    assert get("vllmd_request_duration_seconds_bucket", {**route, "le": "0.25"}) == 1
    assert get("vllmd_request_duration_seconds_bucket", {**route, "le": "0.5"}) == 2
    assert get("vllmd_request_duration_seconds_bucket", {**route, "le": "+Inf"}) == 2
    assert get("vllmd_request_queue_seconds_bucket", {"model": "a", "le": "0.5"}) == 1
    assert get("vllmd_request_queue_seconds_bucket", {"model": "a", "le": "0.25"}) == 0
    assert get("vllmd_time_to_first_byte_seconds_count", {"model": "a"}) == 1
    assert get("vllmd_time_to_first_byte_seconds_bucket", {"model": "a", "le": "0.25"}) == 1
    assert get("vllmd_requests_rejected_total", {"model": "a", "reason": "queue_full"}) == 1


def test_exposition_matches_the_registry(metrics: Metrics) -> None:
    """The fast writer says what `collect()` says (bucket bounds, cumulative counts, sums)."""
    metrics.request("a", "/v1/completions", 200, 0.3)
    metrics.request("a", "/v1/completions", 500, 700)
    body, _ = metrics.exposition()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("vllmd_request"):
                assert metrics.registry.get_sample_value(sample.name, sample.labels) == (
                    sample.value
                )
    get = metrics.registry.get_sample_value
    labels = {"model": "a", "endpoint": "/v1/completions"}
    assert get("vllmd_request_duration_seconds_bucket", {**labels, "le": "600.0"}) == 1
    assert get("vllmd_request_duration_seconds_bucket", {**labels, "le": "+Inf"}) == 2


def test_events_count_loads_restarts_evictions_and_wakes(metrics: Metrics) -> None:
    bus = EventBus()
    metrics.count_events(bus)
    bus.emit(Kind.STATE, "a", old="stopped", new="starting")
    bus.emit(Kind.STATE, "a", old="starting", new="ready", load_seconds=12.0)
    bus.emit(Kind.STATE, "a", old="sleeping", new="waking")
    bus.emit(Kind.STATE, "a", old="waking", new="ready", wake_seconds=3.5)
    bus.emit(Kind.STATE, "a", old="backoff", new="starting", restart_reason="crash")
    bus.emit(Kind.START_FAILED, "a", error="boom", result="timeout")
    bus.emit(Kind.EVICTED, "a", action="sleep", reason="lru", for_model="b", freed_bytes=1)
    get = metrics.registry.get_sample_value
    assert get("vllmd_model_loads_total", {"model": "a", "result": "ok"}) == 1
    assert get("vllmd_model_loads_total", {"model": "a", "result": "timeout"}) == 1
    assert get("vllmd_model_load_duration_seconds_count", {"model": "a"}) == 1
    assert get("vllmd_model_load_duration_seconds_sum", {"model": "a"}) == 12
    assert get("vllmd_model_wake_duration_seconds_count", {"model": "a"}) == 1
    assert get("vllmd_model_wake_duration_seconds_bucket", {"model": "a", "le": "5.0"}) == 1
    assert get("vllmd_model_wake_duration_seconds_bucket", {"model": "a", "le": "2.5"}) == 0
    assert get("vllmd_model_restarts_total", {"model": "a", "reason": "crash"}) == 1
    labels = {"model": "a", "reason": "lru", "action": "sleep"}
    assert get("vllmd_model_evictions_total", labels) == 1


def test_events_dropped_per_subscriber(metrics: Metrics) -> None:
    bus = EventBus()
    metrics.count_events(bus)
    with bus.subscribe("slow", bound=1):
        for _ in range(4):
            bus.emit(Kind.CONTROL, None, action="x")
        get = metrics.registry.get_sample_value
        assert get("vllmd_events_dropped_total", {"subscriber": "slow"}) == 3


def test_build_info_process_and_loop_lag(metrics: Metrics) -> None:
    get = metrics.registry.get_sample_value
    assert get("vllmd_event_loop_lag_seconds") == 0
    metrics.loop_lag(0.25)
    assert get("vllmd_event_loop_lag_seconds") == 0.25
    kinds = families(metrics)
    assert kinds["vllmd_build_info"] == "gauge"
    assert "process_cpu_seconds" in kinds


@pytest.mark.anyio
async def test_lag_monitor_reports_a_blocked_loop(metrics: Metrics) -> None:
    """A loop blocked for 0.2 s shows about that lag on the next tick."""
    async with anyio.create_task_group() as tg:
        await tg.start(run_lag_monitor, metrics, 0.05)
        time.sleep(0.2)
        await anyio.sleep(0.01)  # the overdue tick runs first
        lag = metrics.registry.get_sample_value("vllmd_event_loop_lag_seconds")
        tg.cancel_scope.cancel()
    assert lag is not None and lag >= 0.1


def test_every_family_has_the_designed_type(tmp_path: Path, metrics: Metrics) -> None:
    metrics.watch(
        FakeSupervisor(
            [status(tmp_path, "a", S.READY, measured_bytes=1, pid=1, last_used=1.0)],
            accounts=[account("0")],
            devices={"0": gpu("0")},
        )
    )
    metrics.count_events(EventBus())
    kinds = families(metrics)
    counters = ["requests", "requests_rejected", "model_loads", "model_restarts"]
    counters += ["model_evictions", "events_dropped"]
    histograms = ["request_duration_seconds", "request_queue_seconds"]
    histograms += ["time_to_first_byte_seconds", "model_load_duration_seconds"]
    histograms += ["model_wake_duration_seconds"]
    gauges = ["build_info", "model_info", "event_loop_lag_seconds", "model_state"]
    gauges += ["model_reserved_bytes", "model_memory_used_bytes", "model_in_flight_requests"]
    gauges += ["model_queue_depth", "model_last_used_timestamp_seconds"]
    gauges += [f"device_{n}" for n in DEVICE_SERIES]
    for name in counters:
        assert kinds[f"vllmd_{name}"] == "counter", name
    for name in histograms:
        assert kinds[f"vllmd_{name}"] == "histogram", name
    for name in gauges:
        assert kinds[f"vllmd_{name}"] == "gauge", name


DEVICE_SERIES = [
    "memory_total_bytes",
    "memory_reserved_bytes",
    "memory_used_bytes",
    "memory_foreign_bytes",
    "utilization_ratio",
    "temperature_celsius",
    "power_watts",
    "up",
]


def test_no_created_series(metrics: Metrics) -> None:
    """prometheus_client's `_created` samples are left out, also of collectors others add."""
    other = Counter("vllmd_alert_notifications", "x", ["receiver"], registry=metrics.registry)
    other.labels("am").inc()
    metrics.request("a", "/v1/completions", 200, 0.1)
    metrics.count_events(EventBus())
    body, _ = metrics.exposition()
    assert b"_created" not in body
    assert b'vllmd_alert_notifications_total{receiver="am"} 1.0' in body


def test_others_register_with_the_public_registry(metrics: Metrics) -> None:
    """The alert engine's hook: a collector registered with `registry` is exported."""
    Counter("vllmd_alert_notifications", "x", registry=metrics.registry).inc()
    assert "vllmd_alert_notifications" in families(metrics)


def test_label_values_are_escaped(metrics: Metrics) -> None:
    metrics.rejected('we"ird\\', "queue_full")
    body, _ = metrics.exposition()
    parsed = {
        s.labels["model"]
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if s.name == "vllmd_requests_rejected_total"
    }
    assert parsed == {'we"ird\\'}


# --- /metrics/engines ------------------------------------------------------------------------

ENGINE_A = """# HELP vllm:num_requests_running Requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 1.0
# HELP vllm:prompt_tokens_total Prompt tokens.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="a"} 10.0
"""
ENGINE_B = """# HELP vllm:num_requests_running Requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="b"} 2.0
# HELP vllm:e2e_request_latency_seconds Latency.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="b"} 1.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="b"} 1.0
vllm:e2e_request_latency_seconds_sum{model_name="b"} 0.5
vllm:e2e_request_latency_seconds_count{model_name="b"} 1.0
"""


def test_merge_writes_each_family_once_with_all_samples() -> None:
    text = merge({"a": ENGINE_A, "b": ENGINE_B, "c": None})
    assert text.count("# HELP vllm:num_requests_running ") == 1
    assert text.count("# TYPE vllm:num_requests_running ") == 1
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    running = parsed["vllm:num_requests_running"]
    assert {s.labels["model_name"]: s.value for s in running.samples} == {"a": 1.0, "b": 2.0}
    assert parsed["vllm:e2e_request_latency_seconds"].type == "histogram"
    assert len(parsed["vllm:e2e_request_latency_seconds"].samples) == 4
    success = {s.labels["model"]: s.value for s in parsed["vllmd_engine_scrape_success"].samples}
    assert success == {"a": 1.0, "b": 1.0, "c": 0.0}
    # A family's samples stay together, right after its TYPE line.
    lines = text.splitlines()
    at = lines.index("# TYPE vllm:num_requests_running gauge")
    assert [ln.split("{")[0] for ln in lines[at + 1 : at + 3]] == ["vllm:num_requests_running"] * 2


class Source:
    def __init__(self, text: str, delay: float = 0.0, error: bool = False) -> None:
        self.text, self.delay, self.error = text, delay, error

    async def metrics(self, timeout: float = 2.0) -> str:
        await anyio.sleep(self.delay)
        if self.error:
            raise httpx.ConnectError("refused")
        return self.text


class Engine:
    def __init__(self, name: str, state: InstanceState, api: Source | None) -> None:
        self.name, self.state, self.api = name, state, api


@pytest.mark.anyio
async def test_relay_skips_a_slow_engine_without_waiting_for_it() -> None:
    engines = [
        Engine("a", S.READY, Source(ENGINE_A)),
        Engine("b", S.READY, Source(ENGINE_B, delay=30)),
        Engine("c", S.SLEEPING, Source("", error=True)),
        Engine("d", S.STOPPED, None),
        Engine("e", S.STARTING, Source(ENGINE_B)),
    ]
    started = anyio.current_time()
    body = await relay(engines, timeout=0.2)
    assert anyio.current_time() - started < 2
    text = body.decode()
    assert 'vllmd_engine_scrape_success{model="a"} 1' in text
    assert 'vllmd_engine_scrape_success{model="b"} 0' in text
    assert 'vllmd_engine_scrape_success{model="c"} 0' in text
    assert 'model="d"' not in text and 'model="e"' not in text
    assert 'model_name="b"' not in text
