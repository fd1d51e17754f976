"""The placer: carries out the scheduler's plans, one memory-changing operation per device.

Loads wait in one FIFO queue (`Ticket`s; concurrent requests for a model share one). Each
pass over the queue takes a snapshot, asks `scheduler.plan_load` for each ticket in order and
launches what can run now: evictions, then the start or wake, holding the devices involved
until the start is over. A ticket that must wait keeps its devices for itself, so freed
capacity goes to the head of the queue and large models are not starved by small ones.
Passes run when anything changes (a transition, a request ending, a new ticket) or when the
clock makes a new victim eligible."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from vllmd.config.sizing import require_sized, unsized
from vllmd.context import Context
from vllmd.errors import InsufficientMemory, InvalidState, ShuttingDown, VllmdError, failure
from vllmd.events import Kind
from vllmd.instance.instance import Instance
from vllmd.instance.states import MEMORY_OPERATIONS, STARTS, InstanceState
from vllmd.placement.evict import Evictor, manual_eviction
from vllmd.placement.ledger import Ledger
from vllmd.placement.locks import Hold, Locks
from vllmd.placement.meter import Meter
from vllmd.placement.scheduler import (
    Action,
    Eviction,
    Plan,
    Snapshot,
    next_change,
    plan_idle,
    plan_load,
)
from vllmd.placement.shrink import Fitter
from vllmd.placement.tickets import Interrupted, Ticket, settled

S = InstanceState
log = structlog.get_logger("vllmd.placer")
DEVICE_REFRESH = 5.0
Room = tuple[tuple[str, ...], int]  # what room a start's plan makes: its devices, bytes on each
HEARTBEAT = 1.0  # the loop runs at least this often: the watchdog's sign of its life


class Placer:
    def __init__(self, ctx: Context, instances: Mapping[str, Instance]) -> None:
        self._ctx = ctx
        self._instances = instances  # the supervisor's, read only
        self._events = ctx.events
        self._clock = ctx.clock
        self.meter = Meter(ctx.probe)
        self.locks = Locks()
        self.ledger = Ledger(ctx, instances, self.meter, self.locks)
        self._evictor = Evictor(ctx, instances, self.meter, self.ledger)
        self.fitter = Fitter(instances, self.ledger, self.locks, self._evictor)  # (reloads)
        self._queue: list[Ticket] = []
        self._launched: set[Ticket] = set()  # being carried out
        self._changed = anyio.Event()  # wakes the planning loop (which replaces it)
        self._tick = anyio.Event()  # wakes every other waiter: set and replaced by kick()
        self._closing = False
        self._last_pass = -math.inf  # the loop's heartbeat (the watchdog reads it)
        self._tg: TaskGroup | None = None
        for inst in instances.values():
            self.attach(inst)

    def attach(self, instance: Instance) -> None:
        """Place `instance` from now on (every configured one, and one added later)."""
        instance.on_change(self.kick)
        instance.gate_restarts(partial(self._start_slot, instance))
        self.kick()

    # --- asked by the supervisor ---------------------------------------------------------------

    async def ensure(self, instance: Instance, *, clear_failed: bool = False) -> None:
        """Return once `instance` is READY; raise if it cannot be (rejected, failed start).
        Requests never restart a `failed` model; a deliberate load (clear_failed) does."""
        require_sized(instance.model)  # memory = "auto" with no files to size it: refused
        while instance.state is not S.READY:
            if instance.state is S.FAILED and not instance.wanted_up and not clear_failed:
                raise failure(instance.name, instance.last_error, failed=True)
            if self._closing:
                raise ShuttingDown()
            ticket = self._ticket(instance)
            if clear_failed:
                ticket.deliberate()
            await ticket.done.wait()
            if isinstance(ticket.error, Interrupted):
                continue  # stopped on purpose meanwhile, and still asked for: load it again
            if ticket.error is not None:
                raise ticket.error

    def cancel(self, instance: Instance, error: VllmdError) -> None:
        """Give up the instance's pending loads: their waiters get `error`."""
        for ticket in [*self._queue, *self._launched]:
            if ticket.instance is instance:
                self._finish(ticket, error)
        self.kick()

    async def evict(self, instance: Instance, action: Action) -> None:
        """An operator's sleep or unload, carried out like an eviction (reason `manual`): a
        sleep waits its turn on the model's devices (one memory operation per device); a stop
        goes at once (a starting engine is stopped, not waited for)."""
        name = instance.name
        if action == "sleep":
            # Its turn: no other memory operation on its devices (holds and states alike).
            busy = self._devices_in_operation
            while busy() & set(instance.model.devices) or self.locks.model_busy(name):
                await self._tick.wait()
            if instance.state is not S.READY:
                raise InvalidState(f"model {name} is {instance.state}: only a ready model sleeps")
        elif instance.state in (S.STOPPED, S.FAILED):  # (its waiters were told: supervisor)
            instance.want_down()  # nothing runs: a failed model becomes stopped
            return
        ev = manual_eviction(self.ledger.view(instance), action)
        with self.locks.hold(instance.model.devices if action == "sleep" else (), [name]):
            await self._evictor.evict(ev)
        self.kick()

    def close(self) -> None:
        """Shutting down: no more loads; waiting requests are told at once."""
        self._closing = True
        for ticket in list(self._queue):
            self._finish(ticket, ShuttingDown())
        self.kick()

    @property
    def last_pass(self) -> float:
        return self._last_pass

    def kick(self) -> None:
        """Something changed: plan again soon, and let waiting restarts look again."""
        self._changed.set()
        tick, self._tick = self._tick, anyio.Event()
        tick.set()

    # --- the loop -------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.meter.refresh()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._refresh_devices)
            # Sizes for the level-1 host-memory budget; the reservation bounds them until then.
            tg.start_soon(self.ledger.host.size_weights)
            self._preload()
            task_status.started()
            wake_at, idle_deferred = 0.0, False
            while True:
                self._last_pass = anyio.current_time()
                self._changed = anyio.Event()
                # Most wake-ups are a request ending with nothing queued: then only the timer
                # is worth recomputing, not a snapshot of every model.
                if self._queue or idle_deferred or self._clock() >= wake_at:
                    self._plan_queue()
                    idle_deferred = self._plan_idle(self.ledger.snapshot())
                wake_at = self._next_wake()
                with anyio.move_on_after(max(0.0, min(wake_at - self._clock(), HEARTBEAT))):
                    await self._changed.wait()

    def _devices_in_operation(self) -> set[str]:
        """Devices with a memory-changing operation under way: the placer's own, and those of
        instances changing state by themselves (a restart after a crash, a stop)."""
        busy = set(self.locks.busy_devices())
        for inst in self._instances.values():
            if inst.state in MEMORY_OPERATIONS:
                busy.update(inst.model.devices)
        return busy

    def _start_allowed(self) -> bool:
        """Whether a start or a wake (both load weights) may begin: max_concurrent_starts."""
        starting = sum(1 for i in self._instances.values() if i.state in STARTS)
        return max(starting, self.locks.starts) < self._ctx.config.engine.max_concurrent_starts

    async def _start_slot(self, inst: Instance) -> bool:
        """Wait until `inst` (in backoff) may restart: its devices free of other operations, a
        start slot free and (on GPUs) the crashed engine's memory released. True: restart now
        (the instance becomes STARTING before anything else runs, which then holds the slot
        and the devices). False: the model is no longer wanted, or vllmd is shutting down."""
        while not self._closing and inst.wanted_up:
            others = self.locks.busy_devices() | {
                d
                for i in self._instances.values()
                if i is not inst and i.state in MEMORY_OPERATIONS
                for d in i.model.devices
            }
            if others & set(inst.model.devices) or not self._start_allowed():
                await self._tick.wait()
            elif await self._restart_released(inst):
                return True
        return False

    async def _restart_released(self, inst: Instance) -> bool:
        """Holding the model's devices and a start slot, wait (bounded) until the crashed
        engine's processes have left its GPUs and measured free memory covers the restart:
        like any start, a restart must not race a driver still releasing memory. Gives up at
        once when the model is no longer wanted or vllmd shuts down. False when the memory
        did not come back (told; tried again after the next change, the devices free
        meanwhile) or when given up."""
        if not self.meter.gpus(inst.model.devices):
            return True  # nothing to measure: the old processes are gone (kill waited)
        released = False
        with self.locks.hold(inst.model.devices, start=True):
            async with anyio.create_task_group() as tg:

                async def give_up_when_unwanted() -> None:
                    while inst.wanted_up and not self._closing:
                        await self._tick.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(give_up_when_unwanted)
                need = dict.fromkeys(inst.model.devices, self.ledger.reservation(inst))
                try:
                    await self.meter.wait_released(
                        inst.name, need, inst.last_pids, self._ctx.config.engine.stop_timeout
                    )
                    released = True
                except InsufficientMemory as exc:
                    self._events.emit(Kind.RELEASE_UNVERIFIED, inst.name, problem=str(exc))
                tg.cancel_scope.cancel()
        if not released and inst.wanted_up and not self._closing:
            self.kick()  # the devices are free again for others
            await self._tick.wait()
        return released

    def _ticket(self, instance: Instance) -> Ticket:
        for ticket in self._queue:
            if ticket.instance is instance:
                return ticket
        ticket = Ticket(instance, failures_at_start=instance.start_failures)
        self._queue.append(ticket)
        self.kick()
        return ticket

    def _plan_queue(self) -> None:
        """One pass over the FIFO: launch what can run, keep the rest (and their devices)."""
        held_for_head = self._devices_in_operation()
        snap = self.ledger.snapshot()
        for ticket in list(self._queue):
            inst = ticket.instance
            if inst.state is S.READY:
                self._finish(ticket)
                continue
            if inst.state is S.FAILED and not inst.wanted_up and not ticket.clear_failed:
                self._finish(ticket, failure(inst.name, inst.last_error, failed=True))
                continue
            if inst.state is S.BACKOFF and inst.start_failures != ticket.failures_at_start:
                self._finish(ticket, failure(inst.name, inst.last_error, failed=False))
                continue
            plan = plan_load(snap, inst.name)
            if plan.kind == "route":
                self._finish(ticket)
                continue
            if plan.kind == "reject":
                self._events.emit(
                    Kind.REJECTED, inst.name, reason="insufficient_memory", why=plan.why
                )
                self._finish(ticket, InsufficientMemory(plan.why, retry_after=30.0))
                continue
            devices = set(inst.model.devices)
            for ev in plan.evictions:
                devices |= set(self._instances[ev.model].model.devices)
            blocked = devices & held_for_head or (
                plan.kind in ("start", "wake") and not self._start_allowed()
            )
            if plan.kind == "wait" or blocked:
                held_for_head |= devices
                continue
            held_for_head |= devices
            self._launch(ticket, plan, devices)
            snap = self.ledger.snapshot()

    def _launch(self, ticket: Ticket, plan: Plan, devices: set[str]) -> None:
        assert self._tg is not None
        self._queue.remove(ticket)
        self._launched.add(ticket)
        models = {ticket.instance.name, *(ev.model for ev in plan.evictions)}
        hold = self.locks.hold(devices, models, start=plan.kind in ("start", "wake"))
        inst = ticket.instance
        planned = (inst.model.devices, self.ledger.reservation(inst))  # what room is made for
        self._tg.start_soon(self._carry_out, ticket, plan, hold, planned)

    async def _carry_out(self, ticket: Ticket, plan: Plan, hold: Hold, planned: Room) -> None:
        inst = ticket.instance
        try:
            gone: set[int] = set()  # the victims' pids, which must leave the GPUs
            for ev in plan.evictions:
                if ev.action == "stop":
                    gone |= self._instances[ev.model].pids()
                await self._evictor.evict(ev)
            try:
                # Bounded like a stop: a driver that has not let go by then will not.
                await self.meter.wait_released(
                    plan.model, plan.need, gone, self._ctx.config.engine.stop_timeout
                )
            except InsufficientMemory as exc:
                self._events.emit(Kind.RELEASE_UNVERIFIED, plan.model, problem=str(exc))
                raise
            if ticket.done.is_set() or self._instances.get(inst.name) is not inst:
                return  # cancelled meanwhile (an unload, a removal)
            if (inst.model.devices, self.ledger.reservation(inst)) != planned:
                self._finish(ticket, Interrupted())  # a reload changed its config meanwhile:
                return  # its waiters plan it again, for the new one
            before = inst.transitions
            inst.want_up(self.ledger.launch(inst))
            await inst.until(partial(settled, inst, before))
            if inst.state is S.READY:
                await self.ledger.measure(inst)  # the larger of it and the reservation is held
                self._finish(ticket)
            elif inst.state is S.STOPPED and inst.memory_refused and not self._closing:
                if (gave_up := ticket.refusal()) is not None:
                    self._finish(ticket, gave_up)
                else:  # planned once more, first in line, on fresh readings
                    await self.meter.refresh()
                    self._queue.insert(0, ticket)
            elif inst.state is S.STOPPED:
                # Stopped on purpose while it started (a restart, an unload): an unload
                # cancelled the ticket already; anything else queues the waiters again.
                self._finish(ticket, Interrupted())
            else:
                failed = inst.state is S.FAILED
                self._finish(ticket, failure(inst.name, inst.last_error, failed=failed))
        except VllmdError as exc:
            self._finish(ticket, exc)
        finally:
            self._launched.discard(ticket)
            hold.release()
            self.kick()

    def _finish(self, ticket: Ticket, error: VllmdError | None = None) -> None:
        if ticket in self._queue:
            self._queue.remove(ticket)
        ticket.resolve(error)

    # --- idle models, preload, devices ----------------------------------------------------------

    def _plan_idle(self, snap: Snapshot) -> bool:
        """Start the idle/sleep_ttl evictions due; True if one was deferred (device busy)."""
        deferred = False
        if self._closing:
            return deferred  # every engine is being stopped
        sched = self._ctx.config.scheduler
        ttl = {
            n: (i.model.idle_ttl if i.model.idle_ttl is not None else sched.idle_ttl)
            for n, i in self._instances.items()
        }
        for ev in plan_idle(snap, ttl, sched.sleep_ttl):
            devices = self._instances[ev.model].model.devices
            if self.locks.device_busy(devices) or any(
                t.instance.name == ev.model for t in self._queue
            ):
                deferred = True
                continue
            assert self._tg is not None
            self._tg.start_soon(self._carry_out_idle, ev, self.locks.hold(devices, [ev.model]))
        return deferred

    async def _carry_out_idle(self, ev: Eviction, hold: Hold) -> None:
        try:
            with hold:
                await self._evictor.evict(ev)
        finally:
            self.kick()

    def _next_wake(self) -> float:
        times = []
        if self._queue:
            t = next_change(self.ledger.snapshot())
            if t is not None:
                times.append(t)
        sched = self._ctx.config.scheduler
        for inst in self._instances.values():
            ttl = inst.model.idle_ttl if inst.model.idle_ttl is not None else sched.idle_ttl
            if inst.state is S.READY and ttl > 0 and not self._ctx.overrides.pinned(inst.model):
                times.append(max(inst.last_used, inst.active_since or 0) + ttl)
            if inst.state is S.SLEEPING and sched.sleep_ttl > 0:
                times.append(inst.state_since + sched.sleep_ttl)
        # Deadlines already past were handled (or deferred until an operation ends).
        now = self._clock()
        return min((t for t in times if t > now), default=math.inf)

    def _preload(self) -> None:
        wanted = self._ctx.overrides.loaded_on_purpose  # before a daemon restart, say
        preload = [
            i
            for i in self._instances.values()
            if (i.model.preload or wanted(i.name)) and not unsized(i.model)  # (503s instead)
        ]
        for inst in sorted(preload, key=lambda i: -i.model.priority):
            self._ticket(inst)

    async def _refresh_devices(self) -> None:
        while True:
            await anyio.sleep(DEVICE_REFRESH)
            await self.meter.refresh()
            self.kick()
