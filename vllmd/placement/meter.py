"""Measurements the placer trusts over its own arithmetic: the latest device snapshots, what
an engine really uses, and whether memory freed by a stop has come back on the GPUs.

Every probe call runs through the injected `DeviceProbe` (NVML in worker threads, with
timeouts); the PSS of cpu engines is read in a worker thread too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import MappingProxyType

import anyio

from vllmd.devices import DeviceProbe, DeviceSnapshot, measure_pss
from vllmd.errors import InsufficientMemory

RELEASE_POLL = 0.5


class Meter:
    def __init__(self, probe: DeviceProbe) -> None:
        self._probe = probe
        self.devices: Mapping[str, DeviceSnapshot] = MappingProxyType({})

    async def refresh(self) -> Mapping[str, DeviceSnapshot]:
        self.devices = await self._probe.snapshot()
        return self.devices

    def gpus(self, names: Collection[str]) -> list[str]:
        return [n for n in names if (d := self.devices.get(n)) is not None and d.kind == "gpu"]

    async def gpu_usage(self, pids: Collection[int], devices: Collection[str]) -> int | None:
        """The most `pids` use together on any one of `devices` (GPUs), freshly measured.
        None when NVML cannot tell: a process of theirs without a figure (WDDM, no
        permission), or none of them listed at all (NVML in another pid namespace lists pids
        this host's namespace does not know). Unknown is never 0."""
        await self.refresh()
        most: int | None = None
        for d in devices:
            snap = self.devices.get(d)
            if snap is None:
                continue
            mine = [p.used_bytes for p in snap.processes if p.pid in pids]
            if not mine or any(b is None for b in mine):
                return None
            most = max(most or 0, sum(b for b in mine if b is not None))
        return most

    async def footprint(
        self, leader: int, pids: Collection[int], devices: Collection[str]
    ) -> int | None:
        """An engine's real use per device: on GPUs what NVML says its processes use (None:
        NVML cannot tell), on a cpu device the PSS of its process tree (shared pages once)."""
        gpus = self.gpus(devices)
        if gpus:
            return await self.gpu_usage(pids, gpus)
        return await measure_pss(leader)

    async def wait_released(
        self, model: str, need: Mapping[str, int], gone: Collection[int], bound: float
    ) -> None:
        """Before a start on GPUs: wait (bounded) until the stopped victims' pids have left
        every device's compute-process list and measured free memory covers the need. Raises
        InsufficientMemory naming what did not come back. Declared devices have nothing to
        measure: a stop returns only once the engine's processes are gone."""
        gpus = self.gpus(need)
        if not gpus:
            return
        problem = ""
        with anyio.move_on_after(bound):
            while True:
                await self.refresh()
                lingering = sorted(
                    {p.pid for d in gpus for p in self.devices[d].processes if p.pid in gone}
                )
                short = [d for d in gpus if (self.devices[d].free or 0) < need[d]]
                if not lingering and not short:
                    return
                problem = (
                    f"pids {lingering} still on the device"
                    if lingering
                    else f"measured free memory on {', '.join(short)} below the need"
                )
                await anyio.sleep(RELEASE_POLL)
        raise InsufficientMemory(
            f"memory freed for {model} was not released within {bound:g}s: {problem}",
            retry_after=bound,
        )
