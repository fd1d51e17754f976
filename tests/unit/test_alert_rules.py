"""The alert state machine (vllmd/alerts/rules.py), stepped through injected times."""

from __future__ import annotations

import socket
from types import MappingProxyType

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vllmd.alerts import AlertEngine, AlertsCollector, Notifier, Observations, Signals
from vllmd.alerts.rules import (
    RESOLVED_RETENTION,
    Alert,
    AlertState,
    Evaluator,
    LabelSet,
    fingerprint,
    render,
    this_host,
)
from vllmd.config.schema import AlertRule, AlertsConfig, Config, ModelConfig
from vllmd.instance.states import InstanceState
from vllmd.instance.status import ModelStatus

P, F, R = AlertState.PENDING, AlertState.FIRING, AlertState.RESOLVED
QWEN: LabelSet = (("model", "qwen"),)
LLAMA: LabelSet = (("model", "llama"),)


def rule(for_: float = 60.0, **kw: object) -> AlertRule:
    base: dict[str, object] = {
        "name": "QueueDeep",
        "signal": "model_queue_depth",
        "op": ">",
        "threshold": 5.0,
        "for_": for_,
        "annotations": MappingProxyType({"summary": "{{ $labels.model }} queue at {{ $value }}"}),
    }
    base.update(kw)
    return AlertRule(**base)  # type: ignore[arg-type]


def run(r: AlertRule, steps: list[tuple[float, float | None]]) -> list[AlertState | None]:
    """The state of qwen's alert after each (time, value) step; None: no alert (or no value)."""
    ev = Evaluator("host.example")
    states: list[AlertState | None] = []
    for now, value in steps:
        values = {r.name: {QWEN: value}} if value is not None else {}
        alerts = ev.evaluate([r], values, now)
        states.append(alerts[0].state if alerts else None)
    return states


@pytest.mark.parametrize(
    ("for_", "steps", "expected"),
    [
        # held for `for`: pending, then firing at exactly `for` after it began
        (60, [(0, 9), (30, 9), (60, 9), (90, 9)], [P, P, F, F]),
        # a blip shorter than `for` never fires; the pending alert just disappears
        (60, [(0, 9), (30, 1), (45, 1)], [P, None, None]),
        # flapping restarts the clock each time
        (60, [(0, 9), (30, 1), (45, 9), (90, 9), (105, 9)], [P, None, P, P, F]),
        # for = 0 fires on the first evaluation that holds
        (0, [(0, 1), (15, 9), (30, 1)], [None, F, R]),
        # firing -> resolved when it stops holding; kept resolved for the retention
        (0, [(0, 9), (15, 1), (15 + RESOLVED_RETENTION - 1, 1)], [F, R, R]),
        (0, [(0, 9), (15, 1), (15 + RESOLVED_RETENTION, 1)], [F, R, None]),
        # a missing value (model gone, too few requests) does not hold
        (0, [(0, 9), (15, None)], [F, R]),
        # resolved, then holding again: a new alert starts pending
        (30, [(0, 9), (30, 9), (45, 1), (60, 9), (90, 9)], [P, F, R, P, F]),
        # the threshold itself does not hold for ">"
        (0, [(0, 5)], [None]),
    ],
)
def test_pending_firing_resolved_like_prometheus(
    for_: float, steps: list[tuple[float, float | None]], expected: list[AlertState | None]
) -> None:
    assert run(rule(for_), steps) == expected


@pytest.mark.parametrize(
    ("op", "value", "holds"),
    [
        (">", 6, True),
        (">=", 5, True),
        ("<", 4, True),
        ("<=", 5, True),
        ("==", 5, True),
        ("!=", 5, False),
        ("<", 5, False),
    ],
)
def test_every_operator(op: str, value: float, holds: bool) -> None:
    assert run(rule(0, op=op), [(0, value)]) == [F if holds else None]


def test_one_alert_per_model_with_labels_and_annotations() -> None:
    r = rule(0, labels=MappingProxyType({"team": "ml"}))
    ev = Evaluator("gpu1.example")
    alerts = ev.evaluate([r], {r.name: {QWEN: 9, LLAMA: 7}}, 100.0, {"env": "prod"})
    by_model = {a.labels["model"]: a for a in alerts}
    assert set(by_model) == {"qwen", "llama"}
    qwen = by_model["qwen"]
    assert dict(qwen.labels) == {
        "alertname": "QueueDeep",
        "severity": "warning",
        "model": "qwen",
        "host": "gpu1.example",
        "env": "prod",
        "team": "ml",
    }
    assert qwen.annotations == {"summary": "qwen queue at 9"}
    assert (qwen.state, qwen.active_at, qwen.fired_at, qwen.value) == (F, 100.0, 100.0, 9)


def test_a_model_filter_keeps_only_that_model() -> None:
    r = rule(0, model="llama")
    alerts = Evaluator("h").evaluate([r], {r.name: {QWEN: 9, LLAMA: 9}}, 0.0)
    assert [a.labels["model"] for a in alerts] == ["llama"]


def test_config_labels_may_replace_host_but_not_alertname() -> None:
    r = rule(0, labels=MappingProxyType({"alertname": "Other", "severity": "critical"}))
    (alert,) = Evaluator("h").evaluate([r], {r.name: {QWEN: 9}}, 0.0, {"host": "gpu-a"})
    assert alert.labels["alertname"] == "QueueDeep"
    assert alert.labels["severity"] == "critical"
    assert alert.labels["host"] == "gpu-a"


def test_the_host_name_is_looked_up_at_the_first_alert_not_before() -> None:
    """A reverse DNS lookup at start delayed it (seconds where DNS is broken)."""
    this_host.cache_clear()
    ev = Evaluator()
    r = rule(0)
    assert ev.evaluate([r], {r.name: {QWEN: 1}}, 0.0) == []  # below the threshold
    assert this_host.cache_info().currsize == 0
    (alert,) = ev.evaluate([r], {r.name: {QWEN: 9}}, 1.0)
    assert alert.labels["host"] == socket.getfqdn()


def test_a_removed_rule_resolves_its_firing_alerts() -> None:
    """After a reload drops a rule, its alerts resolve instead of lingering in Alertmanager."""
    r = rule(0)
    ev = Evaluator("h")
    ev.evaluate([r], {r.name: {QWEN: 9}}, 0.0)
    (alert,) = ev.evaluate([], {}, 15.0)
    assert (alert.state, alert.resolved_at, alert.fired_at) == (R, 15.0, 0.0)


def test_pending_keeps_its_active_time_while_the_value_changes() -> None:
    r = rule(60)
    ev = Evaluator("h")
    ev.evaluate([r], {r.name: {QWEN: 9}}, 0.0)
    (alert,) = ev.evaluate([r], {r.name: {QWEN: 12}}, 30.0)
    assert (alert.state, alert.active_at, alert.value) == (P, 0.0, 12)
    assert alert.annotations["summary"] == "qwen queue at 12"


def test_fingerprint_is_alertmanagers() -> None:
    """FNV-1a 64 over sorted label names and values, each followed by 0xff, as
    prometheus/common's LabelSet.Fingerprint (the integration test checks it against a real
    Alertmanager)."""
    assert fingerprint({}) == "cbf29ce484222325"
    a = Alert("X", {"b": "2", "a": "1"}, {}, F, 1.0, 0.0)
    assert a.fingerprint == fingerprint({"a": "1", "b": "2"})
    assert fingerprint({"a": "1"}) != fingerprint({"a": "2"})


def test_render_leaves_unknown_templates_alone() -> None:
    assert render("{{ $labels.nope }}|{{ .Other }}", {}, 1.5) == "|{{ .Other }}"
    assert render("v={{$value}}", {}, 0.25) == "v=0.25"


# --- the engine: one evaluation, its views, the vllmd_alerts series ---------------------------


class _Depth:
    """A fake supervisor's one reader: qwen's queue depth."""

    def __init__(self) -> None:
        self.depth = 0

    def statuses(self) -> list[ModelStatus]:
        model = ModelConfig(name="qwen", model="org/qwen", memory=1, devices=("cpu0",))
        return [
            ModelStatus("qwen", model, InstanceState.READY, 0.0, 0, self.depth, 1, 0, None, None,
                        0, None, None, 0)
        ]  # fmt: skip


def _engine(depth: _Depth, cfg: list[Config], clock: list[float]) -> AlertEngine:
    signals = Signals(Observations(lambda: clock[0]), statuses=depth.statuses, accounts=list,
                      devices=dict)  # fmt: skip
    notifier = Notifier(lambda: cfg[0], host="h")  # not running: nothing is posted
    return AlertEngine(lambda: cfg[0], signals, notifier, clock=lambda: clock[0], host="h")


def test_engine_views_and_the_vllmd_alerts_series() -> None:
    depth, clock = _Depth(), [1_800_000_000.0]
    slow = rule(60, name="QueueDeepLong")
    cfg = [Config(alerts=AlertsConfig(rules=(rule(0), slow), labels={"env": "prod"}))]
    engine = _engine(depth, cfg, clock)
    depth.depth = 9
    engine.evaluate()
    assert engine.firing_count() == 1
    firing, pending = engine.active()
    assert (firing["name"], firing["state"], pending["state"]) == ("QueueDeep", "firing", "pending")
    assert firing == {
        "name": "QueueDeep",
        "state": "firing",
        "labels": {"host": "h", "env": "prod", "model": "qwen", "severity": "warning",
                   "alertname": "QueueDeep"},
        "annotations": {"summary": "qwen queue at 9"},
        "value": 9.0,
        "activeAt": "2027-01-15T08:00:00.000Z",
        "startsAt": "2027-01-15T08:00:00.000Z",
        "fingerprint": firing["fingerprint"],
    }  # fmt: skip
    assert pending["startsAt"] is None
    registry = CollectorRegistry()
    registry.register(AlertsCollector(engine))
    labels = {"alertname": "QueueDeep", "alertstate": "firing", "severity": "warning",
              "model": "qwen", "host": "h", "env": "prod"}  # fmt: skip
    assert registry.get_sample_value("vllmd_alerts", labels) == 1.0
    assert registry.get_sample_value("vllmd_alerts", {**labels, "alertname": "QueueDeepLong",
                                                      "alertstate": "pending"}) == 1.0  # fmt: skip
    depth.depth = 0
    clock[0] += 15
    engine.evaluate()
    assert engine.active() == [] and engine.firing_count() == 0
    assert [a.state for a in engine.alerts()] == [R]  # resolved, kept for the notifier
    assert "vllmd_alerts{" not in generate_latest(registry).decode()


def test_disabling_alerts_by_reload_resolves_what_fired() -> None:
    depth, clock = _Depth(), [0.0]
    cfg = [Config(alerts=AlertsConfig(rules=(rule(0),)))]
    engine = _engine(depth, cfg, clock)
    depth.depth = 9
    engine.evaluate()
    cfg[0] = Config(alerts=AlertsConfig(enabled=False, rules=(rule(0),)))
    clock[0] += 15
    assert [a.state for a in engine.evaluate()] == [R]


@pytest.mark.anyio
async def test_run_evaluates_every_interval_and_survives_a_failing_read() -> None:
    depth = _Depth()
    cfg = [Config(alerts=AlertsConfig(interval=7.0, rules=(rule(0),)))]
    reads: list[int] = []

    def statuses() -> list[ModelStatus]:
        reads.append(1)
        if len(reads) == 2:
            raise RuntimeError("a bug reading a signal")
        return depth.statuses()

    slept: list[float] = []
    done = anyio.Event()

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            done.set()
        await anyio.lowlevel.checkpoint()

    signals = Signals(Observations(), statuses=statuses, accounts=list, devices=dict)
    notifier = Notifier(lambda: cfg[0], host="h")
    engine = AlertEngine(lambda: cfg[0], signals, notifier, sleep=sleep, host="h")
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await done.wait()
        tg.cancel_scope.cancel()
    assert slept == [7.0, 7.0, 7.0] and len(reads) >= 3
