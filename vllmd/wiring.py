"""The one composition root: every component of a daemon built from a `Config` and the
`Seams` (what tests replace), in one place. `daemon.py` decides lifetimes; this decides who
gets what."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllmd.alerts import AlertEngine, AlertsCollector, Observations, Signals
from vllmd.alerts import Notifier as AlertNotifier
from vllmd.config import Config
from vllmd.context import Context
from vllmd.control.api import ControlAPI, refusal
from vllmd.control.listener import UnixServer
from vllmd.devices import CompositeProbe, DeclaredProbe, DeviceProbe, NvmlProbe
from vllmd.engine.kernel_log import KernelLogOpener, Kmsg
from vllmd.engine.process import DescendantsSink, EngineProcess, RuntimeOptions, Spawner, spawn
from vllmd.engine.reaper import Reaper
from vllmd.engine.version import EngineVersions, VersionProbe, installed_version
from vllmd.events import EventBus
from vllmd.gateway.app import Gateway
from vllmd.metrics import Metrics
from vllmd.metrics.app import MetricsApp
from vllmd.store import StateStore
from vllmd.supervisor.commands import Supervisor
from vllmd.supervisor.reload import Reloader
from vllmd.systemd import Notifier


@dataclass
class Seams:
    """What tests replace: how engines are spawned and reaped, how devices are probed, where
    OOM kills are read, the environment (also the daemon's: RUNTIME_DIRECTORY), the clock."""

    spawner: Spawner | None = None  # None: `spawn`, with the reaper and kernel log below
    probe: DeviceProbe | None = None
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    notifier: Notifier = field(default_factory=Notifier)
    clock: Callable[[], float] = time.monotonic  # tests skip ahead (past RECENT_USE, say)
    reaper: Reaper = field(default_factory=Reaper)
    kernel_log: KernelLogOpener = Kmsg
    engine_version: VersionProbe = installed_version  # the engine command's installed vLLM


@dataclass(frozen=True)
class Parts:
    """A daemon's components, wired; `daemon.serve` runs them."""

    ctx: Context
    store: StateStore
    events: EventBus
    metrics: Metrics
    supervisor: Supervisor
    gateway: Gateway
    metrics_app: MetricsApp
    alerts: AlertEngine
    reloader: Reloader
    control: ControlAPI
    control_server: UnixServer
    reaper: Reaper
    notifier: Notifier


def build(config: Config, seams: Seams, runtime_dir: Path) -> Parts:
    # The store owns event ids; it is opened (and the ids continued) before any event.
    store = StateStore(config.daemon.state_dir, retention=lambda: ctx.config.daemon.event_retention)
    events = EventBus(next_id=store.next_id)
    metrics = Metrics()
    ctx = Context(
        config,
        events=events,
        probe=seams.probe or CompositeProbe(NvmlProbe(), DeclaredProbe(config.devices)),
        spawner=seams.spawner or _spawner(seams.reaper, seams.kernel_log, store.note_descendants),
        options=RuntimeOptions(
            runtime_dir=runtime_dir,
            connect_timeout=config.gateway.upstream_connect_timeout,
            max_connections=config.gateway.max_connections,
        ),
        base_env=seams.base_env,
        clock=seams.clock,
        versions=EngineVersions(seams.engine_version),
        run=store.runs.current,
    )
    supervisor = Supervisor(ctx)
    metrics.count_events(events)
    metrics.watch(supervisor)
    metrics.watch_store(store.degraded)
    observations = Observations(clock=ctx.clock)  # the gateway's requests, for the alerts
    observations.listen(events)
    alerts = AlertEngine(
        lambda: ctx.config,
        Signals(
            observations,
            statuses=supervisor.statuses,
            accounts=supervisor.accounts,
            devices=supervisor.devices,
            degraded=store.degraded,
        ),
        AlertNotifier(lambda: ctx.config, count=metrics.alert_notification),
        events=events,
    )
    metrics.registry.register(AlertsCollector(alerts))
    reloader = Reloader(ctx, supervisor, metrics, seams.notifier, supervisor.summary)
    control = ControlAPI(ctx, supervisor, metrics, alerts, reloader, store=store)
    return Parts(
        ctx=ctx,
        store=store,
        events=events,
        metrics=metrics,
        supervisor=supervisor,
        gateway=Gateway(ctx, supervisor, metrics, observations),
        metrics_app=MetricsApp(metrics, engines=lambda: supervisor.instances.values()),
        alerts=alerts,
        reloader=reloader,
        control=control,
        control_server=UnixServer(control, refusal),
        reaper=seams.reaper,
        notifier=seams.notifier,
    )


def _spawner(reaper: Reaper, kernel_log: KernelLogOpener, sink: DescendantsSink) -> Spawner:
    async def spawn_engine(argv: Sequence[str], env: Mapping[str, str]) -> EngineProcess:
        return await spawn(argv, env, reaper=reaper, kernel_log=kernel_log, sink=sink)

    return spawn_engine
