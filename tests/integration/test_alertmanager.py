"""Alerts into a real Alertmanager and a local webhook receiver: an engine built from its
parts (the daemon's signals, rules and notifier) over a fake supervisor whose queue depth the
test moves over and under a rule's threshold."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.fakes.alert_receivers import (
    Alertmanager,
    WebhookReceiver,
    alertmanager,
    alertmanager_binary,
    webhook_receiver,
)
from tests.integration.harness import fake_config
from vllmd.alerts import AlertEngine, Notifier, Observations, Signals
from vllmd.alerts.notify import receiver_name
from vllmd.config import Config
from vllmd.instance.states import InstanceState
from vllmd.instance.status import ModelStatus

pytestmark = pytest.mark.anyio
RULE = "VllmdTestQueueDeep"


def test_alertmanager_is_installed() -> None:
    """Fails, never skips: these tests are the only proof that Alertmanager accepts our alerts."""
    assert alertmanager_binary(), "install the Debian package prometheus-alertmanager"


class FakeSupervisor:
    """The supervisor's readers, with a queue depth the test sets."""

    def __init__(self, config: Config) -> None:
        self.model = config.models["qwen"]
        self.depth = 0

    def statuses(self) -> list[ModelStatus]:
        return [
            ModelStatus("qwen", self.model, InstanceState.READY, 0.0, 0, self.depth,
                        self.model.memory, 0, None, None, 0, None, None, 0)
        ]  # fmt: skip


@dataclass
class Setup:
    am: Alertmanager
    hook: WebhookReceiver
    supervisor: FakeSupervisor
    engine: AlertEngine
    counts: list[tuple[str, str]]
    evaluations: list[float]


def config(tmp_path: Path, am_url: str, hook_url: str) -> Config:
    alerts: dict[str, Any] = {
        "interval": "50ms",
        "resend": "200ms",
        "alertmanager": [am_url],
        "webhooks": [hook_url],
        "labels": {"env": "test"},
        "rules": [
            {
                "name": RULE,
                "signal": "model_queue_depth",
                "op": ">",
                "threshold": 5,
                "for": "0s",
                "severity": "page",
                "annotations": {"summary": "{{ $labels.model }} has {{ $value }} queued"},
            }
        ],
    }
    return fake_config(tmp_path, {"qwen": {}}, alerts=alerts)


@asynccontextmanager
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with alertmanager(tmp_path) as am, webhook_receiver() as hook:
        cfg = config(tmp_path, am.url, hook.url)
        supervisor = FakeSupervisor(cfg)
        counts: list[tuple[str, str]] = []
        evaluations: list[float] = []

        async def sleep(seconds: float) -> None:
            evaluations.append(seconds)
            await anyio.sleep(seconds)

        def current() -> Config:
            return cfg

        signals = Signals(Observations(), statuses=supervisor.statuses, accounts=list, devices=dict)
        notifier = Notifier(
            current,
            count=lambda r, result: counts.append((r, result)),
            host="gpu1.test",
            backoff=(0.05, 0.2),
            timeout=2,
        )
        engine = AlertEngine(current, signals, notifier, sleep=sleep, host="gpu1.test")
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            yield Setup(am, hook, supervisor, engine, counts, evaluations)
            tg.cancel_scope.cancel()


async def until(condition: Callable[[], Any], timeout: float = 10) -> Any:
    """Poll another process's view (Alertmanager's API) until `condition()` is truthy."""
    with anyio.fail_after(timeout):
        while True:
            got = await condition()
            if got:
                return got
            await anyio.sleep(0.05)


async def test_a_firing_alert_reaches_alertmanager_then_its_resolution(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.supervisor.depth = 9

        async def ours() -> list[dict[str, Any]]:
            return [a for a in await s.am.alerts() if a["labels"].get("alertname") == RULE]

        (alert,) = await until(ours)
        assert alert["status"]["state"] == "active"
        assert alert["labels"] == {
            "alertname": RULE,
            "severity": "page",
            "model": "qwen",
            "host": "gpu1.test",
            "env": "test",
        }
        assert alert["annotations"] == {"summary": "qwen has 9 queued"}
        assert alert["generatorURL"] == "http://gpu1.test:0/v1/models"  # the config's port
        (ours_now,) = [a for a in s.engine.active() if a["name"] == RULE]
        assert alert["fingerprint"] == ours_now["fingerprint"]  # Alertmanager's own hash
        assert s.engine.firing_count() == 1

        s.supervisor.depth = 0

        async def gone() -> bool:
            return not await ours()

        await until(gone)  # resolved: endsAt in the past, so no longer listed as active
        assert s.engine.firing_count() == 0
        assert (receiver_name(s.am.url), "error") not in s.counts


async def test_a_webhook_gets_alertmanagers_version_4_payload(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.supervisor.depth = 9
        fired = await s.hook.next_matching("firing")
        s.supervisor.depth = 1
        resolved = await s.hook.next_matching("resolved")
    for body in (fired, resolved):
        assert set(body) == {
            "version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
            "commonLabels", "commonAnnotations", "externalURL", "alerts",
        }  # fmt: skip
        assert body["version"] == "4"
        assert body["groupLabels"] == {"alertname": RULE}
        assert body["commonLabels"]["model"] == "qwen"
        (entry,) = body["alerts"]
        assert set(entry) == {
            "status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint",
        }  # fmt: skip
        assert entry["status"] == body["status"]
    assert fired["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    assert resolved["alerts"][0]["endsAt"] > resolved["alerts"][0]["startsAt"]
    # one POST per change: nothing more while it kept firing
    assert [b["status"] for b in s.hook.bodies] == ["firing", "resolved"]


async def test_alertmanager_down_evaluation_goes_on_and_failures_are_counted(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        s.supervisor.depth = 9
        await s.hook.next_matching("firing")
        await s.am.stop()
        before = len(s.evaluations)
        am = receiver_name(s.am.url)

        async def failed_twice() -> bool:
            return s.counts.count((am, "error")) >= 2

        await until(failed_twice)
        s.supervisor.depth = 0
        await s.hook.next_matching("resolved")  # other receivers are not held up
        assert len(s.evaluations) > before + 2
        assert s.engine.firing_count() == 0


async def test_a_reload_changes_the_rules_at_the_next_evaluation(tmp_path: Path) -> None:
    """The engine reads `config()` each time: a raised threshold resolves the alert."""
    async with alertmanager(tmp_path) as am, webhook_receiver() as hook:
        cfg = config(tmp_path, am.url, hook.url)
        supervisor = FakeSupervisor(cfg)
        supervisor.depth = 9
        current = [cfg]
        signals = Signals(Observations(), statuses=supervisor.statuses, accounts=list, devices=dict)
        notifier = Notifier(lambda: current[0], host="h")
        engine = AlertEngine(lambda: current[0], signals, notifier, host="h")
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await hook.next_matching("firing")
            rules = tuple(
                replace(r, threshold=100.0) if r.name == RULE else r for r in cfg.alerts.rules
            )
            current[0] = replace(cfg, alerts=replace(cfg.alerts, rules=rules))
            await hook.next_matching("resolved")
            tg.cancel_scope.cancel()


async def test_the_host_name_is_looked_up_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the reverse DNS lookup for the `host` label ran on the event loop at the
    first alert (seconds where DNS is broken, every proxied request stalled meanwhile)."""
    import socket
    import time

    from vllmd.alerts.rules import this_host

    def slow_getfqdn(name: str = "") -> str:
        time.sleep(0.5)  # a resolver that takes its time
        return "slow.test"

    monkeypatch.setattr(socket, "getfqdn", slow_getfqdn)
    this_host.cache_clear()
    cfg = config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    supervisor = FakeSupervisor(cfg)
    supervisor.depth = 10  # the rule holds: the first evaluation makes an alert

    def current() -> Config:
        return cfg

    signals = Signals(Observations(), statuses=supervisor.statuses, accounts=list, devices=dict)
    notifier = Notifier(current, count=lambda r, result: None, backoff=(0.05, 0.2), timeout=1)
    engine = AlertEngine(current, signals, notifier)
    gaps: list[float] = []

    async def pace() -> None:  # the loop's own pace while the name is looked up
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pace)
            await anyio.sleep(0.05)
            await tg.start(engine.run)
            await anyio.sleep(1.0)
            alerts = engine.alerts()
            tg.cancel_scope.cancel()
    finally:
        this_host.cache_clear()
    assert max(gaps) < 0.2, f"the loop stalled {max(gaps):.2f} s"
    assert alerts and alerts[0].labels["host"] == "slow.test"
