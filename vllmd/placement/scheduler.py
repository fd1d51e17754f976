"""Placement decisions: pure functions over a snapshot of devices and models.

Nothing here does I/O, sleeps or reads a clock: the placer (`placer.py`) takes a snapshot,
asks for a plan and carries it out. That keeps every rule of the memory budget testable as a
table of snapshots and expected plans.

Accounting, per device: free = total - headroom - foreign - sum(held by our instances), where
an instance holds its full reservation while starting/ready/draining/waking/stopping (or its
measured footprint, when larger), its residue while sleeping, and nothing otherwise. A model
in backoff keeps its reservation (its actor restarts it in a moment; a neighbour must not
take the memory meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Literal

from vllmd.instance.states import EVICTABLE, HOLDING, InstanceState

S = InstanceState
RECENT_USE = 30.0  # a model used this recently is never a victim (it is probably in use)

Action = Literal["sleep", "stop"]
Reason = Literal["lru", "idle", "manual", "reload", "sleep_ttl"]
PlanKind = Literal["route", "start", "wake", "wait", "reject"]
_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DeviceView:
    name: str
    total: int
    headroom: int = 0
    foreign: int = 0  # used by processes vllmd does not own (measured)
    up: bool = True
    cores: int = 0  # a cpu device: the cores its engines get slices of (0: not counted)


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    devices: tuple[str, ...]
    memory: int  # reservation per device
    state: InstanceState = S.STOPPED
    measured: int = 0  # measured footprint per device once ready (0 = not measured)
    residue: int = 0  # per device while asleep (measured, else scheduler.sleep_residue)
    in_flight: int = 0
    last_used: float = 0.0
    active_since: float | None = None  # ready or woken at; min_residency counts from here
    state_since: float = 0.0
    pinned: bool = False
    priority: int = 0
    sleep_level: int = 0  # 0 = cannot sleep (no sleep mode on its devices, or configured so)
    host_bytes: int = 0  # host RAM a level-1 sleep keeps (the weights)
    busy: bool = False  # a memory-changing operation on it is under way
    cores: int = 0  # on a cpu device: the cores its engine takes there

    def held(self) -> int:
        """What this model holds on each of its devices now."""
        return held_bytes(self.state, self.memory, self.measured, self.residue)

    def held_cores(self) -> int:
        """The cores its engine takes on each of its devices now (none unless it runs)."""
        return self.cores if self.state in HOLDING else 0


# A footprint this much over its reservation is still within it: what NVML reports moves by
# a few MiB with the allocator's state. More than this is over-reservation.
OVER_RESERVATION_TOLERANCE = 64 * 1024**2


def over_reservation(measured: int, memory: int) -> int:
    """How far a measured footprint is over its reservation: 0 within the tolerance."""
    over = measured - memory
    return over if over > OVER_RESERVATION_TOLERANCE else 0


def held_bytes(state: InstanceState, memory: int, measured: int, residue: int) -> int:
    """What a model in `state` holds on each of its devices: the one rule, for a view and for
    a caller that needs only this (status readers: building a whole view per model was most
    of a control API call's time with 100 models)."""
    if state in HOLDING:
        return max(memory, measured)
    if state is S.SLEEPING:
        return residue
    return 0


@dataclass(frozen=True)
class Snapshot:
    now: float
    devices: Mapping[str, DeviceView]
    models: Mapping[str, ModelView]
    min_residency: float = 0.0
    evict_to: Action = "sleep"
    host_memory_free: int = 0  # room left for level-1 sleepers' weights in host RAM
    recent_use: float = RECENT_USE

    @cached_property
    def _held(self) -> dict[str, int]:
        """Held per device, summed once per snapshot (plans ask for it many times)."""
        held = dict.fromkeys(self.devices, 0)
        for m in self.models.values():
            amount = m.held()
            if amount:
                for d in m.devices:
                    held[d] = held.get(d, 0) + amount
        return held

    def free(self, device: str) -> int:
        d = self.devices[device]
        return d.total - d.headroom - d.foreign - self._held.get(device, 0)

    def free_cores(self, device: str) -> int:
        """Cores of a cpu device no engine has; a large number where cores are not counted."""
        total = self.devices[device].cores
        if not total:
            return 1 << 30
        taken = sum(m.held_cores() for m in self.models.values() if device in m.devices)
        return total - taken


@dataclass(frozen=True, slots=True)
class Eviction:
    model: str
    action: Action
    reason: Reason
    frees: Mapping[str, int] = field(default_factory=lambda: _EMPTY)  # bytes per device
    level: int = 0  # sleep level, for action "sleep"
    for_model: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    kind: PlanKind
    model: str
    need: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    evictions: tuple[Eviction, ...] = ()
    why: str = ""


def need_of(model: ModelView) -> int:
    """Per device: a wake needs the reservation less the residue it already holds."""
    if model.state is S.SLEEPING:
        return max(0, max(model.memory, model.measured) - model.residue)
    return model.memory


def plan_load(snap: Snapshot, name: str) -> Plan:
    """What to do so `name` can serve: route, start/wake (after evictions), wait or reject."""
    model = snap.models[name]
    if model.state is S.READY:
        return Plan("route", name)
    # FAILED is startable here: the placer only asks for it on a deliberate load.
    if model.busy or model.state not in (S.STOPPED, S.SLEEPING, S.FAILED):
        return Plan("wait", name, why=f"{name} is {model.state}")
    kind: PlanKind = "wake" if model.state is S.SLEEPING else "start"
    need = need_of(model)
    needs = MappingProxyType({d: need for d in model.devices})
    down = [d for d in model.devices if not snap.devices[d].up]
    if down:
        return Plan("wait", name, needs, why=f"device {', '.join(down)} is down")
    free = {d: snap.free(d) for d in model.devices}
    deficit = {d: need - free[d] for d in model.devices if free[d] < need}
    cores = {d: model.cores - snap.free_cores(d) for d in model.devices}
    deficit |= {_core(d): short for d, short in cores.items() if short > 0 and kind == "start"}
    if not deficit:
        return Plan(kind, name, needs)

    victims = _choose_victims(snap, model, deficit, _candidates(snap, model, now_only=True))
    if victims is None:
        if _choose_victims(snap, model, deficit, _candidates(snap, model, now_only=False)) is None:
            short = ", ".join(_short(d, b) for d, b in sorted(deficit.items()))
            return Plan("reject", name, needs, why=f"{name} does not fit: short on {short}")
        return Plan("wait", name, needs, why="victims are busy, recently used or too young")
    return Plan(kind, name, needs, _actions(snap, model, victims, deficit))


def plan_idle(snap: Snapshot, idle_ttl: Mapping[str, float], sleep_ttl: float) -> list[Eviction]:
    """Models idle past their idle_ttl sleep or stop; sleepers past sleep_ttl stop."""
    out: list[Eviction] = []
    host_free = snap.host_memory_free
    for m in snap.models.values():
        if m.pinned or m.busy or m.in_flight:
            continue
        ttl = idle_ttl.get(m.name, 0.0)
        if (
            m.state is S.READY
            and ttl > 0
            and snap.now - max(m.last_used, m.active_since or 0) >= ttl
        ):
            level = sleep_level_of(snap, m, host_free)
            if level:
                host_free -= m.host_bytes if level == 1 else 0
                out.append(Eviction(m.name, "sleep", "idle", _frees(m, sleep=True), level))
            else:
                out.append(Eviction(m.name, "stop", "idle", _frees(m, sleep=False)))
        elif m.state is S.SLEEPING and sleep_ttl > 0 and snap.now - m.state_since >= sleep_ttl:
            out.append(Eviction(m.name, "stop", "sleep_ttl", _frees(m, sleep=False)))
    return out


def next_change(snap: Snapshot) -> float | None:
    """The next time a model becomes a possible victim by the clock alone (min_residency or
    recent use ending): when a waiting load should be planned again."""
    times = []
    for m in snap.models.values():
        if m.state not in EVICTABLE or m.pinned:
            continue
        # A victim must be past every limit at once: the latest of them counts.
        eligible = m.last_used + snap.recent_use
        if m.state is S.READY and m.active_since is not None:
            eligible = max(eligible, m.active_since + snap.min_residency)
        if eligible > snap.now:
            times.append(eligible)
    return min(times) if times else None


# --- internals -------------------------------------------------------------------------------


def _candidates(snap: Snapshot, model: ModelView, *, now_only: bool) -> list[ModelView]:
    """Possible victims, least valuable first: (priority, last used). With now_only=False,
    those that could become victims later (for telling 'wait' from 'never')."""
    out = []
    wanted = set(model.devices)
    for m in snap.models.values():
        if m.name == model.name or m.pinned or m.priority > model.priority:
            continue
        if not any(d in wanted for d in m.devices):
            continue
        if now_only:
            if m.state not in EVICTABLE or m.busy or m.in_flight:
                continue
            if (
                m.state is S.READY
                and m.active_since is not None
                and (snap.now - m.active_since < snap.min_residency)
            ):
                continue
            if snap.now - m.last_used < snap.recent_use:
                continue
        elif m.held() == 0:
            continue
        out.append(m)
    out.sort(key=lambda m: (m.priority, m.last_used, m.name))
    return out


def _choose_victims(
    snap: Snapshot, model: ModelView, deficit: Mapping[str, int], candidates: Iterable[ModelView]
) -> list[ModelView] | None:
    """Take candidates in order until every device's deficit is covered, then drop any that
    turned out not to be needed (most valuable first). None if it cannot be covered."""
    taken: list[ModelView] = []
    remaining = dict(deficit)
    for c in candidates:
        if all(v <= 0 for v in remaining.values()):
            break
        frees = {key: _held(c, key) for key in _keys(c) if remaining.get(key, 0) > 0}
        if not any(frees.values()):
            continue
        taken.append(c)
        for key, amount in frees.items():
            remaining[key] -= amount
    if any(v > 0 for v in remaining.values()):
        return None
    for c in sorted(taken, key=lambda m: (m.priority, m.last_used), reverse=True):
        rest = [t for t in taken if t is not c]
        if _covers(rest, deficit, lambda m: m.held()):
            taken = rest
    return taken


def _covers(
    victims: list[ModelView], deficit: Mapping[str, int], frees_of: Callable[[ModelView], int]
) -> bool:
    """Whether `victims` cover every deficit: memory by `frees_of`, cores by what they take."""
    for key, short in deficit.items():
        device, is_cores = _device(key)
        frees = (lambda m: m.held_cores()) if is_cores else frees_of
        if sum(frees(v) for v in victims if device in v.devices) < short:
            return False
    return True


# A deficit of cores on device D is kept under the key "D#cores", beside D's bytes.
_CORES = "#cores"


def _core(device: str) -> str:
    return device + _CORES


def _device(key: str) -> tuple[str, bool]:
    """The device a deficit's key names, and whether the deficit is of cores."""
    return (key[: -len(_CORES)], True) if key.endswith(_CORES) else (key, False)


def _keys(m: ModelView) -> list[str]:
    return [*m.devices, *(_core(d) for d in m.devices)]


def _held(m: ModelView, key: str) -> int:
    return m.held_cores() if _device(key)[1] else m.held()


def _short(key: str, amount: int) -> str:
    device, is_cores = _device(key)
    return f"{device} by {amount} cores" if is_cores else f"{device} by {amount} bytes"


def _actions(
    snap: Snapshot, model: ModelView, victims: list[ModelView], deficit: Mapping[str, int]
) -> tuple[Eviction, ...]:
    """Sleep each victim where its residue still lets the load fit and host memory allows a
    level-1 sleep (else level 2); otherwise stop it."""
    host_free = snap.host_memory_free
    sleeping: dict[str, int] = {}  # victim -> sleep level
    for v in victims:
        level = sleep_level_of(snap, v, host_free)
        if not level:
            continue

        def frees(m: ModelView, trial: str = v.name) -> int:
            asleep = m.name in sleeping or m.name == trial
            return m.held() - (m.residue if asleep else 0)

        if _covers(victims, deficit, frees):
            sleeping[v.name] = level
            host_free -= v.host_bytes if level == 1 else 0
    out = []
    for v in victims:
        if v.name in sleeping:
            out.append(
                Eviction(
                    v.name, "sleep", "lru", _frees(v, sleep=True), sleeping[v.name], model.name
                )
            )
        else:
            out.append(Eviction(v.name, "stop", "lru", _frees(v, sleep=False), 0, model.name))
    return tuple(out)


def sleep_level_of(snap: Snapshot, m: ModelView, host_free: int) -> int:
    """The level `m` would be put to sleep at now (0: it would be stopped), host RAM allowing."""
    if snap.evict_to != "sleep" or m.sleep_level == 0 or m.state is not S.READY:
        return 0
    if m.sleep_level == 1 and m.host_bytes <= host_free:
        return 1
    return 2


def _frees(m: ModelView, *, sleep: bool) -> Mapping[str, int]:
    amount = m.held() - (m.residue if sleep else 0)
    return MappingProxyType({d: amount for d in m.devices})
