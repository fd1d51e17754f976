"""The supervisor: the command surface the gateway (and the control API) call.

It holds every model's `Instance` and runs their actors; requests get a ready instance through
`acquire` (queued by `Admission`, placed and started by the placer; concurrent requests share
one start); operators load, unload and add models. Readers get `ModelStatus` views. Placement
and eviction decisions are the scheduler's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from vllmd.config import Config, ModelConfig
from vllmd.context import Context
from vllmd.devices import DeviceSnapshot
from vllmd.errors import InvalidState, ModelNotFound, ModelUnloaded, VllmdError
from vllmd.events import Kind
from vllmd.instance.instance import Instance
from vllmd.instance.states import RUNNING, InstanceState
from vllmd.instance.status import ModelStatus
from vllmd.overrides import Overrides
from vllmd.placement.ledger import DeviceAccount
from vllmd.placement.placer import Placer
from vllmd.placement.shrink import shrunk_budgets
from vllmd.store.records import HostMeasured, Overhead
from vllmd.supervisor.admission import Admission

if TYPE_CHECKING:  # the reload's module is loaded by the first reload (see vllmd.supervisor.reload)
    from vllmd.config.diff import ReloadPlan

S = InstanceState
log = structlog.get_logger("vllmd.supervisor")


class Supervisor:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._instances: dict[str, Instance] = {
            name: Instance(model, ctx) for name, model in ctx.config.models.items()
        }
        self._served: dict[str, Instance] = {}  # every served name (name or alias) -> instance
        self._index()
        self.admission = Admission(ctx)
        self._placer = Placer(ctx, self._instances)
        self._ledger = self._placer.ledger  # the accounting's answers, read here
        self._tg: TaskGroup | None = None
        self._actors: dict[str, anyio.CancelScope] = {}

    def learned(self, overheads: Mapping[str, Overhead], host: Mapping[str, HostMeasured]) -> None:
        """What an earlier run measured, per model: GPU overheads (the next starts use them)
        and the host RAM of a level-1 sleep (the next plans do)."""
        self._ledger.learn_overheads(overheads)
        self._ledger.host.learn(host)

    # --- readers -------------------------------------------------------------------------------

    @property
    def instances(self) -> Mapping[str, Instance]:
        """Every model's instance by name (read only)."""
        return MappingProxyType(self._instances)

    @property
    def overrides(self) -> Overrides:
        """What operators changed at run time (read: the supervisor's verbs change it)."""
        return self._ctx.overrides

    def get(self, name: str) -> Instance:
        """The instance of a model named by its name or an alias."""
        instance = self._served.get(name)
        if instance is None:
            raise ModelNotFound(f"The model `{name}` does not exist.")
        return instance

    def status(self, instance: Instance) -> ModelStatus:
        status = instance.status(
            queue_depth=self.admission.depth(instance.name),
            held=self._ledger.held(instance),
            measured=self._ledger.measured(instance.name),
            pinned=self._pinned(instance),
        )
        if instance.model.sizing is None:
            return status
        # Sized from its files: its reservation follows the measured overhead (ledger).
        return replace(status, reserved_bytes=self._ledger.reservation(instance))

    def statuses(self) -> Iterator[ModelStatus]:
        return (self.status(i) for i in list(self._instances.values()))

    def summary(self) -> str:
        """systemd's one-line STATUS: "3 models: 2 ready, 1 sleeping; 46.0/80.0 GiB reserved"."""
        counts: dict[str, int] = {}
        for st in self.statuses():
            counts[st.state.value] = counts.get(st.state.value, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        accounts = self.accounts()
        reserved = sum(a.reserved for a in accounts) / 2**30
        total = sum(a.total for a in accounts) / 2**30
        return f"{sum(counts.values())} models: {parts}; {reserved:.1f}/{total:.1f} GiB reserved"

    def placer_last_pass(self) -> float:
        """When (anyio's clock) the placer's loop last ran: its heartbeat for the watchdog."""
        return self._placer.last_pass

    def accounts(self) -> list[DeviceAccount]:
        """Every device's memory: total, reserved, used, free, and what each model holds."""
        return self._ledger.accounts()

    def devices(self) -> Mapping[str, DeviceSnapshot]:
        """The latest device snapshots."""
        return self._ledger.devices()

    # --- the actors ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for instance in self._instances.values():
                self._start_actor(instance)
            await tg.start(self._placer.run)
            task_status.started()

    def _start_actor(self, instance: Instance) -> None:
        # start_soon, not start: an actor has nothing to wait for (what is asked of it is kept
        # on the instance until its loop looks), and waiting for each one's first step would
        # delay READY by a step per model (docs/performance.md "Start-up").
        assert self._tg is not None, "the supervisor is not running"
        scope = anyio.CancelScope()
        self._actors[instance.name] = scope
        self._tg.start_soon(self._run_actor, instance, scope, name=f"actor {instance.name}")

    async def _run_actor(self, instance: Instance, scope: anyio.CancelScope) -> None:
        with scope:
            await instance.run()

    async def add(self, model: ModelConfig) -> Instance:
        """Add a model to the running daemon, or give a changed one its new config: its engine
        (if any) is stopped first, and its next start uses the config as it is now. The
        instance is kept, so the requests waiting for it go to that start (a new instance
        would leave them waiting on one no longer served). An unchanged model is left as
        it is."""
        instance = self._instances.get(model.name)
        engine = self._ctx.config.engine
        replaced = instance is not None
        if instance is not None:
            if instance.model == model and instance.engine == engine:
                return instance
            await instance.replace(model, engine)
            self._index()  # (its served names may have changed with it)
        else:
            instance = Instance(model, self._ctx)
            self._instances[model.name] = instance
            self._index()
            self._placer.attach(instance)
            self._start_actor(instance)
        # Its checkpoint sized anew (in a thread); a host-RAM figure for other weights forgotten.
        assert self._tg is not None
        self._tg.start_soon(self._ledger.host.replaced, instance, name=f"size {model.name}")
        self._ctx.events.emit(Kind.MODEL_ADDED, model.name, replaced=replaced)
        return instance

    async def apply(self, config: Config, plan: ReloadPlan) -> None:
        """Carry out a reload's plan (`config.diff.plan_reload`): removed models stop and go,
        engine-changing ones are stopped and take their new config (started again if they
        were running, or for the requests waiting), the rest take their new settings in
        place, new ones appear (loaded if `preload`). A device the reload shrinks is then
        evicted on until it fits (placement/shrink.py); where its pinned models would not
        fit, ConfigError is raised before anything changes."""
        old, overrides = self._ctx.config, self._ctx.overrides
        shrunk = shrunk_budgets(old, config, plan.restart, self._instances, self._ledger, overrides)
        running = {n for n, i in self._instances.items() if i.state in RUNNING}
        self._ctx.use_config(config)
        self._ctx.overrides.reconcile(config.models)
        for name in plan.removed:
            await self._remove(self._instances[name])
        replaced = {*plan.restart, *plan.added}
        for name, instance in self._instances.items():
            if name not in replaced:
                instance.reconfigure(config.models[name], config.engine)
        self._index()
        assert self._tg is not None, "apply() needs the supervisor running"
        for name in sorted(replaced):
            instance = await self.add(config.models[name])
            if name in running or instance.model.preload:
                self._tg.start_soon(self._load_quietly, instance)
        self._placer.kick()
        await self._placer.fitter.fit(shrunk)

    async def _remove(self, instance: Instance) -> None:
        name = instance.name
        self._placer.cancel(instance, ModelNotFound(f"model {name} was removed by a reload"))
        await self._stop(instance)
        self._actors.pop(name).cancel()
        del self._instances[name]
        instance.output.close(f"model {name} was removed by a reload")  # `logs -f` ends
        self._ctx.overrides.forget(name)
        self._ctx.events.emit(Kind.MODEL_REMOVED, name)

    async def _load_quietly(self, instance: Instance) -> None:
        try:
            await self._placer.ensure(instance)
        except VllmdError as exc:
            log.warning("reload_load_failed", model=instance.name, error=str(exc))

    def _index(self) -> None:
        self._served = {
            served: inst for inst in self._instances.values() for served in inst.model.served_names
        }

    # --- requests ------------------------------------------------------------------------------

    async def ensure_ready(self, instance: Instance) -> None:
        """Have the instance placed and started if needed; return once it is READY."""
        await self._placer.ensure(instance)

    async def acquire(self, instance: Instance) -> None:
        """Wait until `instance` is READY for one request and count it in flight; the caller
        ends it with `release()`, whatever happens. (A plain pair, not a context manager: an
        async generator per request cost more than the rest of this.)"""
        if instance.state is not S.READY:
            if instance.state is S.FAILED and not instance.wanted_up:
                await self.ensure_ready(instance)  # raises ModelFailed at once, queue or not
            await self.admission.wait(instance, lambda: self.ensure_ready(instance))
        instance.begin_request()

    def release(self, instance: Instance) -> None:
        instance.end_request()

    # --- operators (the control API's verbs) ------------------------------------------------
    # Each checks what it can at once (raising InvalidState before anything happens) and
    # returns the operation to await: `wait=false` callers start it and answer at once.

    async def load(self, instance: Instance) -> None:
        """A deliberate load: clears `failed`; may evict by LRU like any request's load; once
        ready, the model is marked loaded on purpose."""
        await self._placer.ensure(instance, clear_failed=True)
        self._ctx.overrides.mark_loaded(instance.name)

    def unload(self, instance: Instance) -> Awaitable[None]:
        """Stop the model and clear its loaded-on-purpose mark; refused while it is pinned."""
        name = instance.name
        if instance.model.pinned:
            raise InvalidState(
                f"model {name} is pinned in the config: unpin first (set pinned = false, "
                "then reload)"
            )
        if self._pinned(instance):
            raise InvalidState(f"model {name} is pinned: unpin first (`vllmctl unpin {name}`)")
        self._ctx.overrides.clear_loaded(instance.name)
        # Its waiters are told at once, 503 with Retry-After: nothing is wrong with the model.
        self._placer.cancel(instance, ModelUnloaded(f"model {name} was unloaded while it loaded"))
        return self._placer.evict(instance, "stop")

    def sleep(self, instance: Instance) -> Awaitable[None]:
        """Put a ready model to sleep (drained first), where it can sleep."""
        name = instance.name
        if not self._ledger.can_sleep(instance):
            raise InvalidState(
                f"model {name} cannot sleep (sleep mode needs NVML GPUs, transport uds and "
                f"sleep_level > 0): use unload (`vllmctl unload {name}`)"
            )
        if instance.state is S.SLEEPING:
            return _done()
        if instance.state is not S.READY:
            raise InvalidState(f"model {name} is {instance.state}: only a ready model can sleep")
        return self._placer.evict(instance, "sleep")

    def wake(self, instance: Instance) -> Awaitable[None]:
        """Wake a sleeping model; a stopped one is loaded."""
        if instance.state is S.SLEEPING:
            return self._placer.ensure(instance)
        return self.load(instance)

    def restart(self, instance: Instance) -> Awaitable[None]:
        """Stop and start the model's engine again (counted as a restart, reason manual); a
        stopped model is loaded."""
        if instance.state in (S.STOPPED, S.FAILED):
            return self.load(instance)
        return self._restart(instance)

    async def _restart(self, instance: Instance) -> None:
        instance.restart_next("manual")
        try:
            await self._stop(instance)
            await self.load(instance)
        finally:
            instance.restart_next(None)  # spent, or the restart did not happen

    def pin(self, instance: Instance) -> Awaitable[None]:
        """Never evict the model (a stopped one is pinned without being loaded)."""
        self._ctx.overrides.pin(instance.model)
        self._placer.kick()
        return _done()

    def unpin(self, instance: Instance) -> Awaitable[None]:
        if instance.model.pinned:
            raise InvalidState(
                f"model {instance.name} is pinned in the config: change it and reload"
            )
        self._ctx.overrides.unpin(instance.name)
        self._placer.kick()
        return _done()

    def _pinned(self, instance: Instance) -> bool:
        return self._ctx.overrides.pinned(instance.model)

    async def _stop(self, instance: Instance) -> None:
        instance.want_down()
        await instance.wait_state(S.STOPPED, S.FAILED)

    async def stop_all(self) -> None:
        """Stop every engine (in parallel), waiting until each one's processes are gone. No
        load starts once this is called."""
        self._placer.close()
        async with anyio.create_task_group() as tg:
            for instance in self._instances.values():
                tg.start_soon(self._stop, instance)


async def _done() -> None:
    """An operation that was complete when it was asked for."""
