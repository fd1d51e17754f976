"""Reload (SIGHUP, `POST /v1/reload`, `vllmctl reload`): read the config file again, plan the
change (`config.diff`), and have the supervisor carry it out. An invalid file, or one that
changes what needs a daemon restart, changes nothing: the problems are returned and logged."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import structlog

from vllmd.config import load_config
from vllmd.config.sizing import keep_sizing
from vllmd.context import Context
from vllmd.errors import ConfigError
from vllmd.events import Kind
from vllmd.metrics import Metrics
from vllmd.supervisor.commands import Supervisor
from vllmd.systemd import Notifier

if TYPE_CHECKING:
    from vllmd.config.diff import ReloadPlan

log = structlog.get_logger("vllmd.reload")


class Reloader:
    def __init__(
        self,
        ctx: Context,
        supervisor: Supervisor,
        metrics: Metrics,
        notifier: Notifier,
        status: Callable[[], str],
    ) -> None:
        self._ctx = ctx
        self._supervisor = supervisor
        self._metrics = metrics
        self._notifier = notifier
        self._status = status
        self._lock = anyio.Lock()  # one reload at a time

    async def reload(self) -> ReloadPlan:
        """Reload the config file in force; raises ConfigError (nothing changed)."""
        async with self._lock:
            path = self._ctx.config.path
            if path is None:
                raise ConfigError(["the daemon's config did not come from a file"])
            self._notifier.reloading()
            try:
                new = await anyio.to_thread.run_sync(load_config, path)
                new = keep_sizing(self._ctx.config, new)
                # Here, not at start: most daemons never reload (docs/performance.md).
                try:
                    from vllmd.config.diff import plan_reload
                except ImportError as exc:  # (vllmd upgraded under the running daemon)
                    raise ConfigError([f"cannot plan a reload: {exc}"]) from exc
                plan = plan_reload(self._ctx.config, new)
                if plan.refused:
                    raise ConfigError(list(plan.refused))
                await self._supervisor.apply(new, plan)
            except ConfigError as exc:
                self._metrics.reload_result(ok=False)
                self._ctx.events.emit(Kind.RELOAD_FAILED, problems=exc.problems)
                log.error("reload_refused", path=str(path), problems=exc.problems)
                raise
            finally:
                self._notifier.ready(self._status)
            self._metrics.reload_result(ok=True)
            self._ctx.events.emit(
                Kind.RELOADED,
                added=list(plan.added),
                removed=list(plan.removed),
                restarted=list(plan.restart),
                live=list(plan.live),
                keys=list(plan.keys),  # key paths only: api_keys and env hold secrets
            )
            return plan
