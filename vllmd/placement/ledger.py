"""The ledger: the scheduler's view of this host, built fresh from the live instances, the
config and the latest measurements. It decides nothing; `scheduler.py` does, over the
snapshots it builds."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import psutil
import structlog

from vllmd.config import Config
from vllmd.devices import DeviceSnapshot
from vllmd.engine.argv import PlacedDevice
from vllmd.instance.instance import Instance
from vllmd.instance.states import InstanceState
from vllmd.placement.meter import Meter
from vllmd.placement.scheduler import DeviceView, ModelView, Snapshot

S = InstanceState
log = structlog.get_logger("vllmd.ledger")


def _pgid(pid: int) -> int | None:
    """The process group of `pid` (one syscall; None once it is gone)."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class Ledger:
    def __init__(
        self,
        config: Config,
        instances: Mapping[str, Instance],
        meter: Meter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.instances = instances
        self._meter = meter
        self._clock = clock
        self.busy_models: set[str] = set()  # under a placer operation
        self.residue: dict[str, int] = {}  # measured on GPUs once asleep, per model
        # Weights held in host RAM by a level-1 sleeper, per model: sized once by
        # `measure_weights` (a directory walk, in a thread); until then, and where the size is
        # unknown, the model's reservation is the bound.
        self._host_bytes: dict[str, int] = {}
        total_ram = psutil.virtual_memory().total
        self._host_budget = config.scheduler.host_memory or total_ram // 2

    async def measure_weights(self) -> None:
        """Size every model's weights (for the level-1 host-memory budget), in a thread."""
        for name, inst in self.instances.items():
            if name in self._host_bytes:
                continue
            size = await inst.weights()
            if size is None:
                log.info(
                    "weights_unknown",
                    model=name,
                    bound_bytes=inst.model.memory,
                    reason="not a local directory nor in the HF cache: its reservation bounds "
                    "what a level-1 sleep keeps in host RAM",
                )
            self._host_bytes[name] = inst.model.memory if size is None else size

    def host_bytes(self, inst: Instance) -> int:
        return self._host_bytes.get(inst.name, inst.model.memory)

    def place(self, instance: Instance) -> tuple[PlacedDevice, ...]:
        placed = []
        for name in instance.model.devices:
            snap = self._meter.devices.get(name)
            declared = self.config.devices.get(name)
            if snap is not None:
                # vLLM sizes itself against the whole GPU, not a declared budget's share of it.
                total = snap.device_total or snap.total
                placed.append(PlacedDevice(name, snap.kind, total, snap.uuid))
            elif declared is not None:
                total = declared.memory or instance.model.memory
                placed.append(PlacedDevice(name, declared.kind, total, declared.uuid))
            else:
                placed.append(PlacedDevice(name, "gpu", instance.model.memory))
        return tuple(placed)

    def snapshot(self) -> Snapshot:
        sched = self.config.scheduler
        devices = {}
        for name, d in self._device_budgets().items():
            devices[name] = d
        models = {name: self.view(inst) for name, inst in self.instances.items()}
        level1 = sum(
            self.host_bytes(i)
            for i in self.instances.values()
            if i.state is S.SLEEPING and i.sleep_level == 1
        )
        return Snapshot(
            now=self._clock(),
            devices=devices,
            models=models,
            min_residency=sched.min_residency,
            evict_to=sched.evict_to,
            host_memory_free=self._host_budget - level1,
        )

    def _device_budgets(self) -> dict[str, DeviceView]:
        headroom = self.config.scheduler.headroom
        out = {}
        names = set(self._meter.devices) | set(self.config.devices)
        for inst in self.instances.values():
            names |= set(inst.model.devices)
        for name in names:
            snap = self._meter.devices.get(name)
            declared = self.config.devices.get(name)
            if snap is None:
                total = declared.memory if declared is not None and declared.memory else 0
                out[name] = DeviceView(name, total, headroom, 0, up=declared is not None)
                continue
            total = snap.total
            if declared is not None and declared.memory:
                total = min(total, declared.memory)
            out[name] = DeviceView(name, total, headroom, self._foreign(snap), snap.up)
        return out

    def _foreign(self, snap: DeviceSnapshot) -> int:
        """GPU memory used by processes that are not our engines' (cpu devices: none).

        An engine's workers are ours from the moment they exist: while it starts they are not
        yet among its remembered descendants, but they are in its process group (counting
        them as foreign would count the same bytes twice)."""
        if snap.kind != "gpu" or not snap.processes:
            return 0
        ours: set[int] = set()
        groups: set[int] = set()
        for inst in self.instances.values():
            if inst.process is not None:
                ours.add(inst.process.pid)
                ours.update(inst.process.descendants)
                groups.add(inst.process.record.pgid)
            elif inst.state is S.BACKOFF:
                # A crashed engine's pids linger while the driver releases its memory; its
                # reservation is still held: counted once, as ours.
                ours.update(inst.last_pids)
        return sum(
            p.used_bytes or 0
            for p in snap.processes
            if p.pid not in ours and _pgid(p.pid) not in groups
        )

    def view(self, inst: Instance) -> ModelView:
        model = inst.model
        can_sleep = inst.sleep_mode or (
            all(d.kind == "gpu" for d in self.place(inst)) and self.config.engine.transport == "uds"
        )
        return ModelView(
            name=inst.name,
            devices=model.devices,
            memory=model.memory,
            state=inst.state,
            measured=inst.measured_bytes,
            residue=self.residue.get(inst.name, self.config.scheduler.sleep_residue),
            in_flight=inst.in_flight,
            last_used=inst.last_used,
            active_since=inst.active_since,
            state_since=inst.state_since,
            pinned=model.pinned,
            priority=model.priority,
            sleep_level=model.sleep_level if can_sleep else 0,
            host_bytes=self.host_bytes(inst),
            busy=inst.name in self.busy_models,
        )
