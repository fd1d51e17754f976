"""Signals of the alert rules: window math over the gateway's observations, event-fed counts,
and the supervisor's views read through fakes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

import pytest

from vllmd.alerts.signals import TTFB_BOUNDS, Observations, Signals, quantile
from vllmd.config.schema import AlertRule, ModelConfig
from vllmd.devices.snapshot import DeviceSnapshot, unmeasured
from vllmd.events import EventBus, Kind
from vllmd.instance.states import InstanceState
from vllmd.instance.status import ModelStatus
from vllmd.placement.ledger import DeviceAccount

GiB = 1024**3


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def status(name: str, state: InstanceState = InstanceState.READY, **kw: object) -> ModelStatus:
    base = ModelStatus(
        name=name,
        model=ModelConfig(name=name, model=f"org/{name}", memory=4 * GiB, devices=("cpu0",)),
        state=state,
        state_since=0.0,
        in_flight=0,
        queue_depth=0,
        held_bytes=4 * GiB,
        measured_bytes=0,
        last_used=None,
        pid=None,
        restarts=0,
        error=None,
        load_seconds=None,
        sleep_level=0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def account(name: str, total: int, used: int | None, foreign: int = 0) -> DeviceAccount:
    return DeviceAccount(name, "gpu", total, 0, used, total, foreign, True, MappingProxyType({}))


def rule(signal: str, **kw: object) -> AlertRule:
    return AlertRule(name=f"R_{signal}", signal=signal, op=">", threshold=0.0, **kw)  # type: ignore[arg-type]


def signals(
    obs: Observations,
    statuses: list[ModelStatus] | None = None,
    accounts: list[DeviceAccount] | None = None,
    devices: Mapping[str, DeviceSnapshot] | None = None,
    degraded: bool | None = None,
) -> Signals:
    return Signals(
        obs,
        statuses=lambda: statuses or [],
        accounts=lambda: accounts or [],
        devices=lambda: devices or {},
        degraded=None if degraded is None else (lambda: degraded),
    )


def read(s: Signals, r: AlertRule) -> dict[str, float]:
    return {",".join(v for _, v in key) or "-": value for key, value in s.read([r])[r.name].items()}


def test_error_ratio_counts_5xx_over_the_window_only() -> None:
    clock = Clock()
    obs = Observations(clock)
    for i in range(10):  # 10 s ago .. 1 s ago: 2 of 10 failed
        obs.request("qwen", 502 if i < 2 else 200, 0.1, clock.now - 10 + i)
    obs.request("qwen", 500, None, clock.now - 100)  # outside a 30 s window
    obs.request("qwen", 499, None, clock.now)  # a client that left is no server error
    assert obs.counts("qwen", 30, clock.now) == (11, 2)
    assert obs.counts("qwen", 200, clock.now) == (12, 3)
    s = signals(obs, [status("qwen"), status("llama")])
    assert read(s, rule("model_error_ratio", window=30.0, min_requests=11)) == {"qwen": 2 / 11}


def test_error_ratio_has_no_value_below_min_requests() -> None:
    clock = Clock()
    obs = Observations(clock)
    for _ in range(19):
        obs.request("qwen", 500, None, clock.now)
    s = signals(obs, [status("qwen")])
    assert read(s, rule("model_error_ratio", min_requests=20)) == {}
    obs.request("qwen", 500, None, clock.now)
    assert read(s, rule("model_error_ratio", min_requests=20)) == {"qwen": 1.0}


def test_requests_older_than_the_ring_are_forgotten() -> None:
    """A slot reused a ring's length later starts from zero, not from what it held."""
    obs = Observations(horizon=60)
    obs.request("qwen", 500, 1.0, 100.0)
    obs.request("qwen", 200, 1.0, 160.0)  # the same slot, one lap later
    assert obs.counts("qwen", 60, 160.0) == (1, 0)
    assert obs.counts("qwen", 3600, 160.0) == (1, 0)  # windows are cut to the horizon


def test_ttfb_p99_is_interpolated_within_a_bucket() -> None:
    clock = Clock()
    obs = Observations(clock)
    for i in range(99):
        obs.request("qwen", 200, 0.05, clock.now - i % 50)
    obs.request("qwen", 200, 20.0, clock.now)  # the slowest 1 %
    p99 = obs.ttfb_quantile("qwen", 0.99, 300, clock.now)
    assert p99 is not None
    # rank 99 of 100 is the last of the 0.05 s answers: inside 0.05's bucket
    upper = next(b for b in TTFB_BOUNDS if b >= 0.05)
    assert 0.05 / 1.5 < p99 <= upper
    obs.request("qwen", 200, 20.0, clock.now)  # now 2 of 101 are slow: p99 lands on them
    p99 = obs.ttfb_quantile("qwen", 0.99, 300, clock.now)
    assert p99 is not None and 20.0 / 1.5 < p99 <= 20.0 * 1.5


def test_first_byte_alone_feeds_the_p99_but_not_the_request_count() -> None:
    obs = Observations()
    obs.first_byte("qwen", 12.0, 50.0)
    obs.request("qwen", 200, None, 50.0)
    assert obs.counts("qwen", 60, 50.0) == (1, 0)
    p99 = obs.ttfb_quantile("qwen", 0.99, 60, 50.0)
    assert p99 is not None and 8.0 < p99 <= 12.0 * 1.5


def test_ttfb_window_excludes_older_samples_and_none() -> None:
    clock = Clock()
    obs = Observations(clock)
    obs.request("qwen", 200, 30.0, clock.now - 400)
    obs.request("qwen", 200, None, clock.now)
    assert obs.ttfb_quantile("qwen", 0.99, 300, clock.now) is None
    s = signals(obs, [status("qwen")])
    assert read(s, rule("model_ttfb_p99_seconds", window=300.0)) == {}
    assert obs.ttfb_quantile("nobody", 0.99, 300, clock.now) is None


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([0] * (len(TTFB_BOUNDS) + 1), 0.99, None),
        ([10] + [0] * len(TTFB_BOUNDS), 0.5, TTFB_BOUNDS[0] / 2),
        ([0] * len(TTFB_BOUNDS) + [3], 0.99, TTFB_BOUNDS[-1]),  # overflow: its lower bound
    ],
)
def test_quantile_edges(buckets: list[int], q: float, expected: float | None) -> None:
    assert quantile(buckets, q) == expected


def test_restarts_and_evictions_come_from_the_bus() -> None:
    clock = Clock()
    obs = Observations(clock)
    bus = EventBus()
    obs.listen(bus)
    bus.emit(Kind.STATE, "qwen", old="backoff", new="starting", restart_reason="crash")
    bus.emit(Kind.STATE, "qwen", old="stopped", new="starting")  # a start, not a restart
    clock.now += 500
    bus.emit(Kind.STATE, "qwen", old="backoff", new="starting", restart_reason="oom")
    for _ in range(12):
        bus.emit(Kind.EVICTED, "llama", action="sleep", reason="lru", for_model="qwen")
    s = signals(obs, [status("qwen"), status("llama")])
    assert read(s, rule("model_restarts", window=600.0)) == {"qwen": 2, "llama": 0}
    assert read(s, rule("model_restarts", window=60.0)) == {"qwen": 1, "llama": 0}
    assert read(s, rule("evictions_rate", window=120.0)) == {"-": 6.0}


def test_model_state_signals_read_the_statuses() -> None:
    obs = Observations(Clock())
    over = status("qwen", queue_depth=7, measured_bytes=5 * GiB)
    stopped = status("llama", InstanceState.STOPPED, measured_bytes=9 * GiB)
    failed = status("mistral", InstanceState.FAILED)
    s = signals(obs, [over, stopped, failed])
    assert read(s, rule("model_queue_depth")) == {"qwen": 7, "llama": 0, "mistral": 0}
    assert read(s, rule("model_failed")) == {"qwen": 0, "llama": 0, "mistral": 1}
    # a stopped model's last measurement is not a current overuse
    assert read(s, rule("model_memory_over_reservation_bytes")) == {"qwen": GiB}
    assert read(s, rule("model_kv_cache_usage_ratio")) == {}  # not read from engines yet


def test_over_reservation_is_against_the_reservation_now() -> None:
    """A model sized from its files reserves its parts and the overhead its engine measured,
    not its config's memory: a footprint within that is no over-reservation."""
    obs = Observations(Clock())
    sized = status(
        "qwen", measured_bytes=4 * GiB + 300 * 2**20, reserved_bytes=4 * GiB + 290 * 2**20
    )
    over = status("llama", measured_bytes=5 * GiB, reserved_bytes=4 * GiB)
    s = signals(obs, [sized, over])
    assert read(s, rule("model_memory_over_reservation_bytes")) == {"qwen": 0, "llama": GiB}


def test_device_signals_read_accounts_and_snapshots() -> None:
    obs = Observations(Clock())
    accounts = [account("0", 80 * GiB, 60 * GiB, foreign=2 * GiB), account("1", 80 * GiB, None)]
    gpu = replace(unmeasured("0", "gpu", up=True, utilization=0.9), temperature=71.0)
    devices = {"0": gpu, "cpu0": unmeasured("cpu0", "cpu", up=True)}
    s = signals(obs, accounts=accounts, devices=devices)
    assert read(s, rule("device_memory_used_ratio")) == {"0": 0.75}
    assert read(s, rule("device_memory_foreign_bytes")) == {"0": 2 * GiB, "1": 0}
    assert read(s, rule("device_utilization_ratio")) == {"0": 0.9}
    assert read(s, rule("device_temperature_celsius")) == {"0": 71.0}


def test_state_store_degraded_only_once_told_how() -> None:
    obs = Observations(Clock())
    assert read(signals(obs), rule("state_store_degraded")) == {}
    assert read(signals(obs, degraded=True), rule("state_store_degraded")) == {"-": 1.0}


def test_each_source_is_read_once_per_evaluation() -> None:
    calls: list[str] = []

    def statuses() -> list[ModelStatus]:
        calls.append("statuses")
        return [status("qwen")]

    s = Signals(Observations(Clock()), statuses=statuses, accounts=list, devices=dict)
    s.read([rule("model_failed"), rule("model_queue_depth"), rule("device_memory_used_ratio")])
    assert calls == ["statuses"]


@pytest.mark.parametrize("seconds", [8.3, 9.0, 9.5, 10.5, 12.0])
def test_ttfb_p99_is_within_five_percent_near_the_default_threshold(seconds: float) -> None:
    """Regression: buckets sqrt(2) apart put a p99 of 9 s at 11.55 s (the 10 s default rule
    fired on requests that all took under 10 s)."""
    obs = Observations(clock=lambda: 1000.0)
    for _ in range(100):
        obs.request("m", 200, seconds, 1000.0)
    p99 = obs.ttfb_quantile("m", 0.99, 300, 1000.0)
    assert p99 is not None
    assert abs(p99 - seconds) / seconds < 0.05
    assert (p99 > 10) == (seconds > 10)
