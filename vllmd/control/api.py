"""The control API (docs/design.md "Control API"): HTTP/1.1 + JSON on the control socket,
prefix /v1.

It only asks: every state change goes through the supervisor, the same paths the gateway's
requests take. Each connection's peer (SO_PEERCRED) is known; mutating calls are allowed to
root, the daemon's uid and `daemon.control_allow_uids` (when that list is set; otherwise the
socket's file mode is the gate) and recorded in the event log with the peer's uid and pid.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from vllmd import __version__
from vllmd.alerts import AlertEngine
from vllmd.context import Context
from vllmd.control.errors import STATUSES, ControlError
from vllmd.control.listener import Peer, Reply, Request, Streamed
from vllmd.control.query import allow, bool_param, float_param
from vllmd.control.streams import EventLog, logs
from vllmd.errors import (
    ConfigError,
    InsufficientMemory,
    InvalidState,
    ModelNotFound,
    ShuttingDown,
    StartFailed,
    VllmdError,
)
from vllmd.events import EventBus, Kind
from vllmd.instance.instance import Instance
from vllmd.metrics import Metrics
from vllmd.placement.plan import build_plan
from vllmd.store import StateStore
from vllmd.supervisor.commands import Supervisor
from vllmd.supervisor.reload import Reloader
from vllmd.supervisor.views import model_view

log = structlog.get_logger("vllmd.control")
VERBS = frozenset({"load", "unload", "sleep", "wake", "restart", "pin", "unpin"})


def control_error(exc: VllmdError) -> ControlError:
    """The control API's answer to one of vllmd's errors: the one place this mapping lives."""
    message = str(exc)
    if isinstance(exc, ModelNotFound):
        return ControlError("model_not_found", message)
    if isinstance(exc, InsufficientMemory):
        return ControlError("insufficient_memory", message)
    if isinstance(exc, ShuttingDown):
        return ControlError("shutting_down", message)
    if isinstance(exc, StartFailed):
        return ControlError("start_failed", message)
    if isinstance(exc, ConfigError):
        return ControlError("config_invalid", message, {"problems": exc.problems})
    if isinstance(exc, InvalidState):
        return ControlError("invalid_state", message)
    # Anything else that stops a verb (a failed model, a full queue) is the model's state.
    return ControlError("invalid_state", message)


def reply(status: int, payload: object) -> Reply:
    return Reply(status, json.dumps(payload, default=str).encode())


def error_reply(code: str, message: str, extra: dict[str, Any] | None = None) -> Reply:
    return reply(STATUSES[code], {"error": {"code": code, "message": message, **(extra or {})}})


def refusal(status: int, code: str, message: str) -> Reply:
    """What the listener answers a request that breaks its limits, or one whose handling
    failed (a bug: 500 internal_error) (`unix.Refusal`)."""
    return reply(status, {"error": {"code": code, "message": message}})


def found(answer: dict[str, Any] | Streamed) -> Reply | Streamed:
    """A reader's answer (`streams.py`): a stream as it is, an object as a 200."""
    return answer if isinstance(answer, Streamed) else reply(200, answer)


class ControlAPI:
    def __init__(
        self,
        ctx: Context,
        supervisor: Supervisor,
        metrics: Metrics,
        alerts: AlertEngine,
        reloader: Reloader,
        *,
        store: StateStore | None = None,
        daemon_uid: int | None = None,
    ) -> None:
        self._store = store
        self._alerts = alerts
        self._reloader = reloader
        self._ctx = ctx
        self._supervisor = supervisor
        self._events: EventBus = ctx.events
        self._event_log = EventLog(ctx.events, store)
        self._metrics = metrics
        self._daemon_uid = os.getuid() if daemon_uid is None else daemon_uid
        self._started = time.time()
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Holds the operations that outlive their call (`wait=false`, a timed-out wait)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    # --- the handler (unix.Handler) ------------------------------------------------------------

    async def __call__(self, request: Request) -> Reply | Streamed:
        try:
            return await self._route(request)
        except ControlError as exc:
            return error_reply(exc.code, exc.message, exc.extra)
        except VllmdError as exc:
            err = control_error(exc)
            return error_reply(err.code, err.message, err.extra)

    async def _route(self, request: Request) -> Reply | Streamed:
        parts = list(request.segments)
        method = request.method
        path = "/" + "/".join(parts)
        if parts == ["metrics"]:
            allow(method, "GET")
            body, content_type = self._metrics.exposition()
            return Reply(200, body, content_type)
        if not parts or parts[0] != "v1" or len(parts) < 2:
            raise ControlError("not_found", f"no such route: {path}")
        route = parts[1:]
        if route == ["status"]:
            allow(method, "GET")
            return reply(200, self.status())
        if route == ["devices"]:
            allow(method, "GET")
            return reply(200, {"devices": self.devices(with_models=True)})
        if route == ["plan"]:
            allow(method, "GET")
            return reply(200, self.plan())
        if route == ["reload"]:
            allow(method, "POST")
            return await self._reload(request)
        if route == ["alerts"]:
            allow(method, "GET")
            return reply(200, {"alerts": self._alerts.active()})
        if route == ["events"]:
            allow(method, "GET")
            return found(await self._event_log.read(request.query))
        if route == ["models"]:
            allow(method, "GET")
            return reply(200, {"models": [self._view(st) for st in self._supervisor.statuses()]})
        if route[0] == "models" and len(route) == 2:
            allow(method, "GET")
            instance = self._supervisor.get(route[1])
            return reply(200, self._view(self._supervisor.status(instance)))
        if route[0] == "models" and len(route) == 3 and route[2] == "logs":
            allow(method, "GET")
            return found(logs(self._supervisor.get(route[1]), request.query))
        if route[0] == "models" and len(route) == 3 and route[2] in VERBS:
            allow(method, "POST")
            return await self._verb(request, route[1], route[2])
        raise ControlError("not_found", f"no such route: {path}")

    # --- readers -----------------------------------------------------------------------------

    def _view(self, status: Any) -> dict[str, Any]:
        view = model_view(status, int(self._started))["vllmd"]
        return {"name": status.name, **view}

    def devices(self, *, with_models: bool = False) -> list[dict[str, Any]]:
        accounts = self._supervisor.accounts()
        out = []
        for dev in accounts:
            entry: dict[str, Any] = {
                "name": dev.name,
                "kind": dev.kind,
                "total_bytes": dev.total,
                "reserved_bytes": dev.reserved,
                "used_bytes": dev.used,
                "free_bytes": dev.free,
                "up": dev.up,
                "pids_unseen": asdict(dev.pids_unseen) if dev.pids_unseen else None,
            }
            if with_models:
                entry["models"] = [
                    {"name": name, "reserved_bytes": held} for name, held in dev.models.items()
                ]
            out.append(entry)
        return out

    def plan(self) -> dict[str, Any]:
        """Each device's models in their parts, estimated and measured (placement/plan.py)."""
        totals = {dev.name: dev.total or None for dev in self._supervisor.accounts()}
        statuses = list(self._supervisor.statuses())
        measured = {st.name: st.measured_bytes for st in statuses if st.measured_bytes}
        reserved = {st.name: st.reserved_bytes for st in statuses if st.reserved_bytes}
        return build_plan(self._ctx.config, totals, measured, reserved)

    def status(self) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        for instance in self._supervisor.instances.values():  # states only: no whole views
            by_state[instance.state.value] = by_state.get(instance.state.value, 0) + 1
        path = self._ctx.config.path
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self._started, 3),
            "config_path": str(path) if path is not None else None,
            "devices": self.devices(),
            "models_by_state": by_state,
            "alerts_firing": self._alerts.firing_count(),
        }

    # --- verbs ---------------------------------------------------------------------------------

    async def _verb(self, request: Request, name: str, verb: str) -> Reply:
        peer = request.peer
        if not self._may_mutate(peer):  # before the lookup: a refused peer learns nothing
            self._events.emit(
                Kind.CONTROL,
                name,
                action=verb,
                uid=peer.uid,
                pid=peer.pid,
                result="forbidden",
            )
            raise ControlError(
                "forbidden",
                f"uid {peer.uid} may not {verb} models: only root, the daemon's uid and "
                "daemon.control_allow_uids may",
            )
        instance = self._supervisor.get(name)
        wait = bool_param(request.query, "wait", default=True)
        default_timeout = self._ctx.config.engine.startup_timeout + 30
        timeout = float_param(request.query, "timeout", default_timeout)
        operation = self._operation(instance, verb)  # raises at once when refused
        self._events.emit(
            Kind.CONTROL,
            instance.name,
            action=verb,
            uid=peer.uid,
            pid=peer.pid,
            result="accepted",
        )
        done = anyio.Event()
        outcome: list[VllmdError] = []

        async def carry_out() -> None:
            try:
                await operation
            except VllmdError as exc:
                outcome.append(exc)
                log.warning(
                    "control_action_failed", model=instance.name, action=verb, error=str(exc)
                )
            except Exception:
                # A bug must not end the control API's task group (the daemon's).
                log.exception("control_action_crashed", model=instance.name, action=verb)
                outcome.append(VllmdError(f"{verb} of {instance.name} failed: see the log"))
            finally:
                done.set()

        assert self._tg is not None, "the control API's run() is not running"
        self._tg.start_soon(carry_out)
        if not wait:
            return reply(202, self._view(self._supervisor.status(instance)))
        with anyio.move_on_after(timeout):
            await done.wait()
        view = self._view(self._supervisor.status(instance))
        if not done.is_set():
            raise ControlError(
                "timeout",
                f"{verb} of {instance.name} not done within {timeout:g}s (state "
                f"{view['state']}); it goes on: `vllmctl ps` shows how it ends",
                {"model": view},
            )
        if outcome:
            err = control_error(outcome[0])
            raise ControlError(err.code, err.message, {**err.extra, "model": view})
        return reply(200, view)

    async def _reload(self, request: Request) -> Reply:
        peer = request.peer
        allowed = self._may_mutate(peer)
        self._events.emit(
            Kind.CONTROL,
            None,
            action="reload",
            uid=peer.uid,
            pid=peer.pid,
            result="accepted" if allowed else "forbidden",
        )
        if not allowed:
            raise ControlError("forbidden", f"uid {peer.uid} may not reload the daemon")
        plan = await self._reloader.reload()  # ConfigError: 422 with the problems
        return reply(
            200,
            {
                "reloaded": True,
                "added": list(plan.added),
                "removed": list(plan.removed),
                "restarted": list(plan.restart),
                "live": list(plan.live),
                "changed": list(plan.keys),  # every changed key path, never a value
            },
        )

    def _operation(self, instance: Instance, verb: str) -> Awaitable[None]:
        sup = self._supervisor
        ops: dict[str, Callable[[Instance], Awaitable[None]]] = {
            "load": sup.load,
            "unload": sup.unload,
            "sleep": sup.sleep,
            "wake": sup.wake,
            "restart": sup.restart,
            "pin": sup.pin,
            "unpin": sup.unpin,
        }
        return ops[verb](instance)

    def _may_mutate(self, peer: Peer) -> bool:
        allowed = self._ctx.config.daemon.control_allow_uids
        if not allowed:
            return True  # the socket's mode and group are the gate
        return peer.uid in (0, self._daemon_uid) or peer.uid in allowed
