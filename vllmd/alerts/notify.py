"""Telling receivers about alerts: Alertmanager (API v2) and plain webhooks.

Every Alertmanager gets every alert, as Prometheus sends them: firing ones re-sent every
`resend` with `endsAt = now + 4 x max(resend, interval)` (so Alertmanager resolves them itself
if vllmd goes away), resolved ones with `endsAt` = the resolve time, re-sent while the rules
keep them (15 min). Webhooks get the JSON Alertmanager posts to its own webhook receivers
(version "4"), one POST per alertname whenever an alert of it starts or stops firing.

`offer` only records what is due, per receiver; one task per receiver posts it, retrying with
backoff. Newer news of an alert replaces older unsent news, so a receiver that is down holds at
most one entry per alert, and a slow one never delays the evaluation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from vllmd.alerts.rules import Alert, AlertState, this_host
from vllmd.config.schema import Config

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger("vllmd.alerts")

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of a firing alert in webhooks
RECEIVER = "vllmd"  # the receiver name webhooks are told
BACKOFF = (1.0, 60.0)  # first retry delay, longest delay (doubling in between)
Count = Callable[[str, Literal["ok", "error"]], None]


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def receiver_name(url: str) -> str:
    """A receiver as counted and logged: scheme, host and port only (URLs may carry a user,
    a password or a token in the path)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def generator_url(config: Config, host: str) -> str:
    external = config.alerts.external_url
    return external or f"http://{host}:{config.gateway.listen.port}/v1/models"


def _ignore(receiver: str, result: Literal["ok", "error"]) -> None:
    pass


@dataclass(eq=False)
class _Receiver:
    url: str
    kind: Literal["alertmanager", "webhook"]
    # Alertmanager: fingerprint -> alert; webhook: alertname -> (fingerprint -> alert).
    pending: dict[str, Any] = field(default_factory=dict)
    wake: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    @property
    def name(self) -> str:
        return receiver_name(self.url)

    async def news(self) -> None:
        """Until something is queued."""
        await self.wake.wait()
        self.wake = anyio.Event()

    def take(self) -> dict[str, Any]:
        batch, self.pending = self.pending, {}
        return batch


class Notifier:
    def __init__(
        self,
        config: Callable[[], Config],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        count: Count = _ignore,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        host: str | None = None,
        timeout: float = 10.0,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self._config = config
        self._transport = transport
        self._count = count
        self._sleep = sleep
        self._host = host  # None: this_host() (looked up by the alert engine, in a thread)
        self._timeout = timeout
        self._backoff = backoff
        self._receivers: dict[tuple[str, str], _Receiver] = {}
        self._sent: dict[str, tuple[AlertState, float]] = {}  # fingerprint -> last sent
        self._firing: dict[str, set[str]] = {}  # alertname -> fingerprints webhooks know firing
        self._client: httpx.AsyncClient | None = None
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Post what `offer` queues until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    task_status.started()
                    await anyio.sleep_forever()
                finally:
                    self._tg = None
        finally:
            client, self._client = self._client, None
            if client is not None:
                # Shielded: closing under the daemon's cancellation would leave sockets open.
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        # Made at the first post, not at start: its SSL context (the CA bundle read and
        # parsed) and httpcore's import are a large share of the daemon's start-up, and
        # most daemons never send an alert. Sync, so receivers' tasks cannot make two.
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(transport=self._transport, timeout=self._timeout)
        return self._client

    def offer(self, alerts: Sequence[Alert], now: float) -> None:
        """The latest evaluation's alerts at `now` (unix s): queue what each receiver is due."""
        config = self._config()
        self._sync_receivers(config)
        due = self._due_for_alertmanager(alerts, now, config)
        changes = self._webhook_changes(alerts, config)
        for receiver in self._receivers.values():
            if receiver.kind == "alertmanager" and due:
                receiver.pending.update(due)
                receiver.wake.set()
            elif receiver.kind == "webhook" and changes:
                for alertname, group in changes.items():
                    receiver.pending[alertname] = _merge(receiver.pending.get(alertname), group)
                receiver.wake.set()

    def _due_for_alertmanager(
        self, alerts: Sequence[Alert], now: float, config: Config
    ) -> dict[str, dict[str, Any]]:
        resend, interval = config.alerts.resend, config.alerts.interval
        valid_until = now + 4 * max(resend, interval)
        due: dict[str, dict[str, Any]] = {}
        current: set[str] = set()
        for alert in alerts:
            if alert.state is AlertState.PENDING:
                continue
            fp = alert.fingerprint
            current.add(fp)
            last = self._sent.get(fp)
            if last is not None and last[0] is alert.state and now - last[1] < resend:
                continue
            self._sent[fp] = (alert.state, now)
            ends = alert.resolved_at if alert.resolved_at is not None else valid_until
            due[fp] = {
                "labels": dict(alert.labels),
                "annotations": dict(alert.annotations),
                "startsAt": rfc3339(alert.fired_at or alert.active_at),
                "endsAt": rfc3339(ends),
                "generatorURL": self._generator_url(config),
            }
        for fp in set(self._sent) - current:
            del self._sent[fp]
        return due

    def _webhook_changes(
        self, alerts: Sequence[Alert], config: Config
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Per alertname whose firing set changed: its firing alerts and the ones that just
        resolved, as webhook alert entries."""
        by_name: dict[str, list[Alert]] = {}
        for alert in alerts:
            if alert.state is not AlertState.PENDING:
                by_name.setdefault(alert.name, []).append(alert)
        changes: dict[str, dict[str, dict[str, Any]]] = {}
        for alertname in set(by_name) | set(self._firing):
            group = by_name.get(alertname, [])
            known = self._firing.get(alertname, set())
            firing = {a.fingerprint for a in group if a.state is AlertState.FIRING}
            if firing == known:
                continue
            told = [a for a in group if a.fingerprint in firing | known]
            url = self._generator_url(config)
            changes[alertname] = {a.fingerprint: _webhook_alert(a, url) for a in told}
            if firing:
                self._firing[alertname] = firing
            else:
                self._firing.pop(alertname, None)
        return changes

    def _generator_url(self, config: Config) -> str:
        return generator_url(config, self._host or this_host())

    def _sync_receivers(self, config: Config) -> None:
        wanted = {("alertmanager", u) for u in config.alerts.alertmanager} | {
            ("webhook", u) for u in config.alerts.webhooks
        }
        for key in set(self._receivers) - wanted:
            self._receivers.pop(key).scope.cancel()
        if self._tg is None:
            return  # not running: nothing can be posted, nothing is queued
        for kind, url in wanted - set(self._receivers):
            receiver = _Receiver(url, "alertmanager" if kind == "alertmanager" else "webhook")
            self._receivers[(kind, url)] = receiver
            self._tg.start_soon(self._work, receiver, name=f"notify {receiver.name}")

    async def _work(self, receiver: _Receiver) -> None:
        failures = 0
        with receiver.scope:
            while True:
                await receiver.news()
                while receiver.pending:
                    batch = receiver.take()
                    failed = await self._post(receiver, batch)
                    if not failed:
                        failures = 0
                        continue
                    for key in failed:  # what came meanwhile is newer: it wins
                        if receiver.kind == "alertmanager":
                            receiver.pending.setdefault(key, batch[key])
                        else:
                            receiver.pending[key] = _merge(batch[key], receiver.pending.get(key))
                    failures += 1
                    first, longest = self._backoff
                    await self._sleep(min(longest, first * 2 ** (failures - 1)))

    async def _post(self, receiver: _Receiver, batch: dict[str, Any]) -> list[str]:
        """Post `batch`; the keys that failed."""
        if receiver.kind == "alertmanager":
            url = receiver.url.rstrip("/") + "/api/v2/alerts"
            ok = await self._send(receiver, url, list(batch.values()))
            return [] if ok else list(batch)
        config = self._config()
        external = self._generator_url(config)
        failed = []
        for alertname, group in batch.items():
            if not await self._send(
                receiver, receiver.url, webhook_payload(alertname, group, external)
            ):
                failed.append(alertname)
        return failed

    async def _send(self, receiver: _Receiver, url: str, body: object) -> bool:
        import httpx  # at the first alert sent, not at the daemon's start

        try:
            response = await self._http().post(url, json=body)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self._count(receiver.name, "error")
            log.warning("alert_notification_failed", receiver=receiver.name, error=_why(exc))
            return False
        except Exception as exc:  # a URL httpx cannot use, ...: never the daemon's end
            self._count(receiver.name, "error")
            log.warning("alert_notification_failed", receiver=receiver.name, error=repr(exc))
            return False
        self._count(receiver.name, "ok")
        return True


def _why(exc: httpx.HTTPError) -> str:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def _merge(
    older: dict[str, dict[str, Any]] | None, newer: dict[str, dict[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """Unsent webhook news of one alertname: the newer wins, resolutions are never lost."""
    kept = {fp: a for fp, a in (older or {}).items() if a["status"] == "resolved"}
    return {**kept, **(newer or {})}


def _webhook_alert(alert: Alert, generator: str) -> dict[str, Any]:
    resolved = alert.state is AlertState.RESOLVED and alert.resolved_at is not None
    return {
        "status": "resolved" if resolved else "firing",
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "startsAt": rfc3339(alert.fired_at or alert.active_at),
        "endsAt": rfc3339(alert.resolved_at) if alert.resolved_at is not None else ZERO_TIME,
        "generatorURL": generator,
        "fingerprint": alert.fingerprint,
    }


def _common(dicts: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not dicts:
        return {}
    first, *rest = dicts
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in rest)}


def webhook_payload(
    alertname: str, group: Mapping[str, Mapping[str, Any]], external_url: str
) -> dict[str, Any]:
    """What Alertmanager posts to a webhook receiver (version "4"), for one alertname."""
    alerts = sorted(group.values(), key=lambda a: (a["status"], a["fingerprint"]))
    firing = any(a["status"] == "firing" for a in alerts)
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{alertname}"}}',
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": RECEIVER,
        "groupLabels": {"alertname": alertname},
        "commonLabels": _common([a["labels"] for a in alerts]),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": external_url,
        "alerts": alerts,
    }
