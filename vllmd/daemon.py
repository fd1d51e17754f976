"""The daemon's whole life in one place: task groups nested by lifetime.

    serve()
    └── task group
        ├── reaper (waits for engine processes that died as the daemon's children)
        ├── supervisor (one actor per model)
        ├── gateway, metrics listener (vllmd.httpserver.server on pre-bound sockets)
        └── watchdog / status
    shutdown trigger -> stop accepting -> drain + stop every engine -> exit

The shutdown trigger is injected (`shutdown=event.wait`) so tests stop the daemon
deterministically; the CLI passes one fed by SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from vllmd.config import Config, Listen
from vllmd.control.listener import bind_unix
from vllmd.engine.reaper import become_subreaper
from vllmd.errors import ConfigError, ListenFailed
from vllmd.events import EventBus, Kind
from vllmd.httpserver.server import Server
from vllmd.metrics import Metrics, run_lag_monitor
from vllmd.store import recover
from vllmd.supervisor.commands import Supervisor
from vllmd.supervisor.reload import Reloader
from vllmd.systemd import Notifier
from vllmd.wiring import Seams, build

log = structlog.get_logger("vllmd.daemon")


def bind(listen: Listen, key: str = "gateway.listen") -> socket.socket:
    """Bind a listening TCP socket; errors surface here, before READY=1, as ListenFailed
    naming the address and the config key."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    # Protocol given explicitly: asyncio sets TCP_NODELAY on accepted sockets only when it
    # is IPPROTO_TCP, and without it a stream's head and first chunk, written apart, wait
    # ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ListenFailed(f"cannot listen on {listen} ({key}): {reason}") from exc
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class Running:
    """What `serve()` reports once READY: for tests and tools in the same process."""

    gateway_url: str
    supervisor: Supervisor
    events: EventBus
    metrics: Metrics
    control_socket: Path
    metrics_url: str | None = None  # the `[metrics] listen` listener, when configured


async def serve(
    config: Config,
    shutdown: Callable[[], Awaitable[None]],
    seams: Seams | None = None,
    *,
    force: Callable[[], Awaitable[None]] | None = None,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until `shutdown()` returns, then stop cleanly. `force()` returning
    skips the drain: every engine is killed at once."""
    seams = seams or Seams()
    notifier = seams.notifier
    if become_subreaper():
        log.debug("child_subreaper")
    # Everything made before a failure (a busy port, a probe error) is undone in reverse.
    with contextlib.ExitStack() as undo:
        undo.callback(log.info, "stopped")
        undo.callback(notifier.close)
        runtime_dir = Path(
            tempfile.mkdtemp(prefix="vllmd-", dir=seams.base_env.get("RUNTIME_DIRECTORY"))
        )
        undo.callback(shutil.rmtree, runtime_dir, ignore_errors=True)
        parts = build(config, seams, runtime_dir)
        supervisor, gateway, reaper, store = (
            parts.supervisor,
            parts.gateway,
            parts.reaper,
            parts.store,
        )
        await store.open()  # never raises: a store that cannot open is degraded
        parts.ctx.overrides.restore(
            store.desired.pins, store.desired.loaded_on_purpose, config.models
        )
        supervisor.learned(store.overheads, store.host_measured)
        devices = await parts.ctx.probe.snapshot()
        log.info(
            "devices",
            devices={n: {"kind": d.kind, "total": d.total, "up": d.up} for n, d in devices.items()},
        )
        sock = undo.enter_context(bind(config.gateway.listen))
        server = Server(
            gateway,
            max_connections=config.gateway.max_connections,
            graceful=config.engine.drain_timeout + 1,
        )
        listeners = [(server, sock)]
        metrics_sock: socket.socket | None = None
        if config.metrics.listen is not None:
            metrics_sock = undo.enter_context(bind(config.metrics.listen, "metrics.listen"))
            listeners.append(
                (Server(parts.metrics_app, max_connections=64, graceful=1), metrics_sock)
            )
        control_path = config.daemon.control_socket
        control_sock = undo.enter_context(
            bind_unix(
                control_path, config.daemon.control_socket_mode, config.daemon.control_socket_group
            )
        )
        undo.callback(_unlink, control_path)

        async with anyio.create_task_group() as tg:
            await tg.start(reaper.run)
            await tg.start(store.run, parts.events, parts.ctx.overrides)
            # A previous run's engines that outlived it go before anything is scheduled: those
            # recorded, and any process marked by an earlier run of this state dir.
            earlier = store.runs.on_this_boot()
            done = await recover(store.engines, parts.ctx.probe, parts.events, earlier)
            await store.forget_engines(done)
            await tg.start(supervisor.run)
            await tg.start(run_lag_monitor, parts.metrics)
            await tg.start(parts.alerts.run)
            await tg.start(parts.control.run)
            await tg.start(_reload_on_sighup, parts.reloader)  # before READY: HUP is ours
            await tg.start(parts.control_server.serve, control_sock)
            for each_server, each_sock in listeners:
                await each_server.start(each_sock)
            gateway.open()
            notifier.ready(supervisor.summary)
            log.info(
                "ready",
                gateway=str(config.gateway.listen),
                control=str(control_path),
                metrics=str(config.metrics.listen or config.gateway.listen),
                models=sorted(supervisor.instances),
            )
            metrics_url = _url(metrics_sock) if metrics_sock is not None else None
            task_status.started(
                Running(
                    _url(sock), supervisor, parts.events, parts.metrics, control_path, metrics_url
                )
            )
            tg.start_soon(_report_status, parts.events, supervisor, notifier)
            tg.start_soon(_watchdog, notifier, supervisor)

            await shutdown()
            log.info("shutting_down")
            notifier.stopping()
            notifier.extend_timeout(config.engine.drain_timeout + config.engine.stop_timeout + 30)
            gateway.close()
            for each_server, _ in listeners:
                tg.start_soon(each_server.shutdown)
            if force is not None:
                async with anyio.create_task_group() as stop_tg:

                    async def stop_then_end() -> None:
                        await supervisor.stop_all()
                        stop_tg.cancel_scope.cancel()

                    async def force_then_end() -> None:
                        await force()
                        log.warning("forced_shutdown")
                        stop_tg.cancel_scope.cancel()

                    stop_tg.start_soon(stop_then_end)
                    stop_tg.start_soon(force_then_end)
            else:
                await supervisor.stop_all()
            with anyio.CancelScope(shield=True):
                await reaper.reap()  # what died on the way out
                gateway.close()  # again: the request lines of the drain, written now
                await store.drain()
            tg.cancel_scope.cancel()


async def _reload_on_sighup(
    reloader: Reloader, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """SIGHUP reloads, like `vllmctl reload` (which also reports a bad config)."""
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            with contextlib.suppress(ConfigError):  # logged and counted by the reloader
                await reloader.reload()


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def _report_status(events: EventBus, supervisor: Supervisor, notifier: Notifier) -> None:
    with events.subscribe("systemd-status") as stream:
        async for event in stream:
            if event.kind is Kind.STATE:
                notifier.status(supervisor.summary)


async def _watchdog(notifier: Notifier, supervisor: Supervisor) -> None:
    """WATCHDOG=1 every WATCHDOG_USEC/2, only while the daemon is healthy: its event loop runs
    on time (this very timer less than WATCHDOG_USEC/4 late) and the placer's loop has run
    within WATCHDOG_USEC/2. A down GPU is not unhealthy: its probe runs in a thread."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    late = 0.0
    while True:
        since_pass = anyio.current_time() - supervisor.placer_last_pass()
        if late < interval / 2 and since_pass < interval:
            notifier.watchdog()
        else:
            log.warning("watchdog_withheld", loop_lag=round(late, 3), placer_idle=since_pass)
        asked = anyio.current_time() + interval
        await anyio.sleep(interval)
        late = max(0.0, anyio.current_time() - asked)
