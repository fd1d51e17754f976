"""Notifications through httpx.MockTransport: Alertmanager v2 payloads and resends, webhook
version-4 payloads, retries with backoff, counting, and never raising."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from anyio import wait_all_tasks_blocked

from vllmd.alerts.notify import Notifier, receiver_name, rfc3339
from vllmd.alerts.rules import Alert, AlertState
from vllmd.config.schema import AlertsConfig, Config

pytestmark = pytest.mark.anyio
AM = "http://am1:9093"
HOOK = "http://hooks.example:8080/alerts/secret-token"
T0 = 1_800_000_000.0


def firing(model: str = "qwen", at: float = T0, name: str = "QueueDeep") -> Alert:
    labels = {"alertname": name, "severity": "warning", "model": model, "host": "h.example"}
    return Alert(name, labels, {"summary": f"{model} deep"}, AlertState.FIRING, 9.0, at - 30, at)


def resolved(alert: Alert, at: float) -> Alert:
    return Alert(
        alert.name,
        alert.labels,
        alert.annotations,
        AlertState.RESOLVED,
        alert.value,
        alert.active_at,
        alert.fired_at,
        at,
    )


class Receivers:
    """A MockTransport handler: every request recorded; `answers` says how to answer."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.answers: list[int | Exception] = []  # consumed first; then 200
        self.delays: list[float] = []
        self.counts: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        if answer == 200:  # what a receiver accepted
            self.posts.append((str(request.url), json.loads(request.content)))
        return httpx.Response(answer)

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        await anyio.lowlevel.checkpoint()

    def count(self, receiver: str, result: str) -> None:
        self.counts.append((receiver, result))


def config(**alerts: Any) -> Callable[[], Config]:
    cfg = Config(alerts=AlertsConfig(**{"resend": 60.0, "interval": 15.0, **alerts}))
    return lambda: cfg


@asynccontextmanager
async def notifier(receivers: Receivers, cfg: Callable[[], Config]) -> AsyncIterator[Notifier]:
    n = Notifier(
        cfg,
        transport=httpx.MockTransport(receivers),
        count=receivers.count,
        sleep=receivers.sleep,
        host="h.example",
    )
    async with anyio.create_task_group() as tg:
        await tg.start(n.run)
        yield n
        tg.cancel_scope.cancel()


async def offer(n: Notifier, alerts: list[Alert], now: float) -> None:
    n.offer(alerts, now)
    await wait_all_tasks_blocked()


async def test_firing_alerts_go_to_every_alertmanager_with_endsat_ahead() -> None:
    rx = Receivers()
    async with notifier(rx, config(alertmanager=(AM, "http://am2:9093/"))) as n:
        pending = Alert("Slow", {"alertname": "Slow"}, {}, AlertState.PENDING, 1.0, T0)
        await offer(n, [firing(), pending], T0)
    assert sorted(url for url, _ in rx.posts) == [
        "http://am1:9093/api/v2/alerts",
        "http://am2:9093/api/v2/alerts",
    ]
    (body,) = {json.dumps(b) for _, b in rx.posts}  # both got the same
    assert json.loads(body) == [
        {
            "labels": {"alertname": "QueueDeep", "severity": "warning", "model": "qwen",
                       "host": "h.example"},
            "annotations": {"summary": "qwen deep"},
            "startsAt": rfc3339(T0),
            "endsAt": rfc3339(T0 + 4 * 60),  # 4 x max(resend, interval)
            "generatorURL": "http://h.example:8000/v1/models",
        }
    ]  # fmt: skip
    assert sorted(rx.counts) == [("http://am1:9093", "ok"), ("http://am2:9093", "ok")]


async def test_firing_alerts_are_resent_every_resend_only() -> None:
    rx = Receivers()
    async with notifier(rx, config(alertmanager=(AM,), interval=120.0)) as n:
        await offer(n, [firing()], T0)
        await offer(n, [firing()], T0 + 15)
        await offer(n, [firing()], T0 + 59)
        assert len(rx.posts) == 1
        await offer(n, [firing()], T0 + 60)
    assert len(rx.posts) == 2
    assert rx.posts[1][1][0]["endsAt"] == rfc3339(T0 + 60 + 4 * 120)


async def test_resolved_alerts_end_at_their_resolve_time_and_are_resent() -> None:
    rx = Receivers()
    alert = firing()
    async with notifier(rx, config(alertmanager=(AM,))) as n:
        await offer(n, [alert], T0)
        gone = resolved(alert, T0 + 20)
        await offer(n, [gone], T0 + 20)  # a state change: sent at once
        await offer(n, [gone], T0 + 35)
        await offer(n, [gone], T0 + 80)  # a resend later: again
        await offer(n, [], T0 + 20 + 900)  # the rules dropped it: no more
    ends = [body[0]["endsAt"] for _, body in rx.posts]
    assert ends == [rfc3339(T0 + 240), rfc3339(T0 + 20), rfc3339(T0 + 20)]
    assert all(body[0]["startsAt"] == rfc3339(T0) for _, body in rx.posts)


@dataclass(frozen=True)
class _WithExternalURL(AlertsConfig):
    """`alerts.external_url` until vllmd.config parses it."""

    external_url: str = ""


async def test_external_url_is_the_generator_url() -> None:
    rx = Receivers()
    alerts = _WithExternalURL(alertmanager=(AM,), external_url="https://grafana.example/d/vllmd")
    cfg = Config(alerts=alerts)
    async with notifier(rx, lambda: cfg) as n:
        await offer(n, [firing()], T0)
    assert rx.posts[0][1][0]["generatorURL"] == "https://grafana.example/d/vllmd"


WEBHOOK_FIELDS = {
    "version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
    "commonLabels", "commonAnnotations", "externalURL", "alerts",
}  # fmt: skip
ALERT_FIELDS = {
    "status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"
}  # fmt: skip


async def test_webhooks_get_alertmanagers_version_4_payload_per_alertname_and_change() -> None:
    rx = Receivers()
    qwen, llama = firing("qwen"), firing("llama", at=T0 + 15)
    other = firing("qwen", name="Other")
    async with notifier(rx, config(webhooks=(HOOK,))) as n:
        await offer(n, [qwen, other], T0)
        assert len(rx.posts) == 2  # one per alertname
        await offer(n, [qwen, other], T0 + 60)  # no change: nothing, whatever `resend` says
        assert len(rx.posts) == 2
        await offer(n, [qwen, llama, other], T0 + 75)
        await offer(n, [resolved(qwen, T0 + 90), llama, other], T0 + 90)
        await offer(n, [resolved(qwen, T0 + 90), resolved(llama, T0 + 105), other], T0 + 105)
    assert {url for url, _ in rx.posts} == {HOOK}
    deep = [body for _, body in rx.posts if body["groupLabels"] == {"alertname": "QueueDeep"}]
    told = [(b["status"], [(a["labels"]["model"], a["status"]) for a in b["alerts"]]) for b in deep]
    assert told == [
        ("firing", [("qwen", "firing")]),
        ("firing", [("llama", "firing"), ("qwen", "firing")]),
        ("firing", [("llama", "firing"), ("qwen", "resolved")]),
        ("resolved", [("llama", "resolved")]),
    ]  # fmt: skip
    first = deep[0]
    assert set(first) == WEBHOOK_FIELDS
    assert first["version"] == "4"
    assert first["groupKey"] == '{}:{alertname="QueueDeep"}'
    assert first["truncatedAlerts"] == 0
    assert first["receiver"] == "vllmd"
    assert first["externalURL"] == "http://h.example:8000/v1/models"
    assert first["commonLabels"] == dict(qwen.labels)
    assert first["commonAnnotations"] == {"summary": "qwen deep"}
    (entry,) = first["alerts"]
    assert set(entry) == ALERT_FIELDS
    assert entry["endsAt"] == "0001-01-01T00:00:00Z"
    assert entry["fingerprint"] == qwen.fingerprint
    assert deep[1]["commonLabels"] == {"alertname": "QueueDeep", "severity": "warning",
                                       "host": "h.example"}  # fmt: skip
    last = deep[-1]["alerts"][0]
    assert (last["startsAt"], last["endsAt"]) == (rfc3339(T0 + 15), rfc3339(T0 + 105))


async def test_a_failing_receiver_is_retried_with_backoff_and_counted() -> None:
    rx = Receivers()
    rx.answers = [500, httpx.ConnectError("refused"), 503]
    async with notifier(rx, config(alertmanager=(AM,))) as n:
        await offer(n, [firing()], T0)
    assert rx.delays == [1.0, 2.0, 4.0]  # doubling
    assert rx.counts == [(AM, "error")] * 3 + [(AM, "ok")]
    assert [url for url, _ in rx.posts] == ["http://am1:9093/api/v2/alerts"]


async def test_a_failing_webhook_is_retried_and_counted_under_its_host_only() -> None:
    rx = Receivers()
    rx.answers = [httpx.ConnectError("refused")]
    async with notifier(rx, config(webhooks=(HOOK,))) as n:
        await offer(n, [firing()], T0)
    assert rx.delays == [1.0]
    hook = "http://hooks.example:8080"
    assert rx.counts == [(hook, "error"), (hook, "ok")]
    assert [url for url, _ in rx.posts] == [HOOK]


async def test_news_arriving_during_an_outage_replaces_older_unsent_news() -> None:
    """A receiver that is down holds one entry per alert: the newest."""
    rx = Receivers()
    rx.answers = [httpx.ConnectError("refused")]
    alert = firing()
    blocked = anyio.Event()

    async def slow_sleep(seconds: float) -> None:
        rx.delays.append(seconds)
        await blocked.wait()

    n = Notifier(
        config(alertmanager=(AM,)),
        transport=httpx.MockTransport(rx),
        count=rx.count,
        sleep=slow_sleep,
        host="h.example",
    )
    async with anyio.create_task_group() as tg:
        await tg.start(n.run)
        await offer(n, [alert], T0)  # fails; backs off
        await offer(n, [resolved(alert, T0 + 15)], T0 + 15)
        blocked.set()
        await wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    ((_, body),) = rx.posts
    assert [a["endsAt"] for a in body] == [rfc3339(T0 + 15)]


async def test_a_receiver_raising_anything_http_never_escapes() -> None:
    rx = Receivers()
    rx.answers = [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("bad")] * 3
    async with notifier(rx, config(alertmanager=(AM,))) as n:
        await offer(n, [firing()], T0)
    assert len(rx.posts) == 1 and len(rx.delays) == 6


async def test_receivers_removed_by_a_reload_stop_receiving() -> None:
    rx = Receivers()
    current = config(alertmanager=(AM,))
    async with notifier(rx, lambda: current()) as n:
        await offer(n, [firing()], T0)
        current = config(alertmanager=("http://am2:9093",))
        await offer(n, [firing("llama")], T0 + 15)
    assert [url for url, _ in rx.posts] == [
        "http://am1:9093/api/v2/alerts",
        "http://am2:9093/api/v2/alerts",
    ]


def test_receiver_names_carry_no_credentials_or_paths() -> None:
    assert receiver_name("https://user:pw@am.example:9443/x?token=1") == "https://am.example:9443"
    assert receiver_name("http://[::1]:9093") == "http://[::1]:9093"
