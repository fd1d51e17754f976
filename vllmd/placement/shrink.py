"""A reload that shrinks a device (its declared `memory`, or `scheduler.headroom`): refused
where the pinned models would no longer fit, else carried out by evicting until every shrunk
device fits its new budget again.

Before anything is applied, `shrunk_budgets` finds the devices whose budget after the headroom
the new config lowers and refuses the reload (ConfigError, one line per device) where what the
pinned models hold there now would not fit. A pinned model that holds nothing (stopped) needs
nothing now: a later load of it is planned as any other (rejected if it cannot fit).

Once the new config is in use, `Fitter.fit` evicts on those devices: first the models the
usual rules let go (idle, not recently used, past min_residency; least valuable first; put to
sleep where the residue still lets the device fit), then, where that is not enough, busy and
recently used ones too, drained and stopped. Every such eviction has reason `reload`.
`plan_fit` decides, over a snapshot, like the scheduler."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from functools import partial
from types import MappingProxyType

import structlog

from vllmd.config import Config
from vllmd.devices import DeviceSnapshot, budget_total
from vllmd.errors import ConfigError
from vllmd.instance.instance import Instance
from vllmd.instance.states import EVICTABLE, MEMORY_OPERATIONS, InstanceState
from vllmd.overrides import Overrides
from vllmd.placement.evict import Evictor
from vllmd.placement.ledger import Ledger
from vllmd.placement.locks import Locks
from vllmd.placement.reservation import reservation
from vllmd.placement.scheduler import Eviction, ModelView, Snapshot, sleep_level_of
from vllmd.units import format_size

S = InstanceState
log = structlog.get_logger("vllmd.placer")


def shrunk_budgets(
    old: Config,
    new: Config,
    restarted: Collection[str],
    instances: Mapping[str, Instance],
    ledger: Ledger,
    overrides: Overrides,
) -> dict[str, int]:
    """The devices `new` gives less room after the headroom than `old`: name -> the new room.
    Raises ConfigError where the models pinned under `new` (their key or a runtime pin that
    outlives the reload) hold more there now than that room; a `restarted` one counts its new
    reservation on its new devices (it is started again)."""
    readings = ledger.devices()
    names = set(readings) | set(old.devices) | set(new.devices)
    shrunk = {
        name: after
        for name in sorted(names)
        if (after := _room(readings, new, name)) is not None
        and after < (_room(readings, old, name) or 0)
    }
    pinned: dict[str, dict[str, int]] = {name: {} for name in shrunk}
    for name, inst in instances.items():
        model = new.models.get(name)
        if model is None or not overrides.pinned(model) or not ledger.held(inst):
            continue  # not pinned after the reload, or holding nothing: it needs nothing now
        if name in restarted:
            held = reservation(model, partial(ledger.overhead, inst))
        else:
            held = ledger.held(inst)
        for device in model.devices:
            if device in pinned:
                pinned[device][name] = held
    problems = [
        _problem(old, new, device, shrunk[device], holds)
        for device, holds in pinned.items()
        if sum(holds.values()) > shrunk[device]
    ]
    if problems:
        raise ConfigError(problems)
    return shrunk


def _room(readings: Mapping[str, DeviceSnapshot], config: Config, device: str) -> int | None:
    """What the ledger would budget on `device` under `config`, less the headroom (None: a
    device of unknown size, nothing to judge)."""
    total = budget_total(readings.get(device), config.devices.get(device))
    return total - config.scheduler.headroom if total else None


def _problem(old: Config, new: Config, device: str, room: int, holds: Mapping[str, int]) -> str:
    was, now = old.devices.get(device), new.devices.get(device)
    memory_changed = (was.memory if was else 0) != (now.memory if now else 0)
    key = f"devices.{device}.memory" if memory_changed else "scheduler.headroom"
    return (
        f"{key}: {format_size(max(0, room))} after the headroom cannot hold the pinned models "
        f"{', '.join(sorted(holds))} ({format_size(sum(holds.values()))}) on {device}: unpin "
        "them or keep the size"
    )


# --- planning (pure) --------------------------------------------------------------------------


def plan_fit(snap: Snapshot, over: Mapping[str, int]) -> tuple[Eviction, ...]:
    """Evictions (reason `reload`) that bring each device of `over` (name -> bytes over its
    budget) back within it: the usual victims first (least valuable first), then busy and
    recently used ones (idle before busy, least recently used first), none pinned or in an
    operation. Where even all of them do not cover it, all of them (as near a fit as it gets)."""
    holders = [
        m
        for m in snap.models.values()
        if not m.pinned
        and not m.busy
        and m.state in EVICTABLE
        and m.held() > 0
        and any(d in over for d in m.devices)
    ]
    usual = sorted(
        (m for m in holders if _usual_victim(snap, m)),
        key=lambda m: (m.priority, m.last_used, m.name),
    )
    rest = sorted(
        (m for m in holders if m not in usual),
        key=lambda m: (m.priority, m.in_flight > 0, m.last_used, m.name),
    )
    victims = _take([*usual, *rest], over)
    return _evictions(snap, victims, over, {m.name for m in usual})


def _usual_victim(snap: Snapshot, m: ModelView) -> bool:
    """What the scheduler's own candidates are (`scheduler._candidates`, now_only)."""
    young = (
        m.state is S.READY
        and m.active_since is not None
        and snap.now - m.active_since < snap.min_residency
    )
    return not m.in_flight and not young and snap.now - m.last_used >= snap.recent_use


def _take(candidates: list[ModelView], over: Mapping[str, int]) -> list[ModelView]:
    """Candidates in order until every device is covered, then without those the rest covers
    anyway (the last taken, the most valuable, looked at first)."""
    taken: list[ModelView] = []
    remaining = dict(over)
    for c in candidates:
        if all(v <= 0 for v in remaining.values()):
            break
        short = [d for d in c.devices if remaining.get(d, 0) > 0]
        if not short:
            continue
        taken.append(c)
        for d in short:
            remaining[d] -= c.held()
    if not _covers(taken, over, lambda m: m.held()):
        return taken
    for c in reversed(list(taken)):
        rest = [t for t in taken if t is not c]
        if _covers(rest, over, lambda m: m.held()):
            taken = rest
    return taken


def _covers(
    victims: Iterable[ModelView], over: Mapping[str, int], frees: Callable[[ModelView], int]
) -> bool:
    chosen = list(victims)
    return all(sum(frees(v) for v in chosen if d in v.devices) >= n for d, n in over.items())


def _evictions(
    snap: Snapshot, victims: list[ModelView], over: Mapping[str, int], sleepable: Collection[str]
) -> tuple[Eviction, ...]:
    """Sleep a usual victim where its residue still lets every device fit (and host memory
    allows a level-1 sleep, else level 2); stop the rest."""
    host_free = snap.host_memory_free
    asleep: dict[str, int] = {}  # victim -> sleep level
    for v in victims:
        level = sleep_level_of(snap, v, host_free) if v.name in sleepable else 0
        if not level:
            continue

        def frees(m: ModelView, trial: str = v.name) -> int:
            return m.held() - (m.residue if m.name in asleep or m.name == trial else 0)

        if _covers(victims, over, frees):
            asleep[v.name] = level
            host_free -= v.host_bytes if level == 1 else 0
    out = []
    for v in victims:
        level = asleep.get(v.name, 0)
        amount = v.held() - (v.residue if level else 0)
        frees_bytes = MappingProxyType(dict.fromkeys(v.devices, amount))
        out.append(Eviction(v.name, "sleep" if level else "stop", "reload", frees_bytes, level))
    return tuple(out)


# --- carrying it out --------------------------------------------------------------------------


class Fitter:
    """Evicts on the devices a reload shrank until they fit, holding them (and the victims)
    like any memory operation; an operation under way there is waited for first."""

    def __init__(
        self, instances: Mapping[str, Instance], ledger: Ledger, locks: Locks, evictor: Evictor
    ) -> None:
        self._instances = instances  # the supervisor's, read only
        self._ledger = ledger
        self._locks = locks
        self._evictor = evictor

    async def fit(self, devices: Collection[str]) -> None:
        """Return once each of `devices` fits its budget, or nothing left there can be evicted
        (told: `reload_overcommitted`)."""
        while True:
            snap = self._ledger.snapshot()
            over = {d: -snap.free(d) for d in devices if d in snap.devices and snap.free(d) < 0}
            if not over:
                return
            evictions = plan_fit(snap, over)
            involved = {d for ev in evictions for d in snap.models[ev.model].devices} | set(over)
            if await self._operation_ended(involved):
                continue  # one memory operation per device: planned again once it is over
            if not evictions:
                log.warning(
                    "reload_overcommitted",
                    over_bytes=over,
                    reason="what holds memory there is pinned or cannot be evicted",
                )
                return
            with self._locks.hold(involved, [ev.model for ev in evictions]):
                for ev in evictions:
                    await self._evictor.evict(ev)

    async def _operation_ended(self, devices: set[str]) -> bool:
        """Wait for a memory operation under way on `devices` to end; False if none was."""
        if self._locks.device_busy(devices):
            await self._locks.released()
            return True
        for inst in self._instances.values():
            if inst.state in MEMORY_OPERATIONS and devices & set(inst.model.devices):
                await inst.until(partial(_settled, inst))
                return True
        return False


def _settled(inst: Instance) -> bool:
    return inst.state not in MEMORY_OPERATIONS
