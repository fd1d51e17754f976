"""Devices: GPUs discovered through NVML (`nvml.py`), devices declared in `[devices.X]`,
process memory. The one owner of device totals (`budget_total`, `engine_total`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import replace

import anyio
import anyio.to_thread

from vllmd.devices.host import CpuUse, host_memory_total
from vllmd.devices.nvml import NvmlProbe
from vllmd.devices.snapshot import (
    DeclaredDevice,
    DeviceProbe,
    DeviceSnapshot,
    GpuProcess,
    budget_total,
    engine_total,
    unmeasured,
)
from vllmd.errors import NvmlUnavailable

__all__ = [
    "CompositeProbe",
    "DeclaredDevice",
    "DeclaredProbe",
    "DeviceProbe",
    "DeviceSnapshot",
    "GpuProcess",
    "NvmlProbe",
    "NvmlUnavailable",
    "budget_total",
    "engine_total",
    "measure_pss",
    "measure_rss",
    "process_tree_pss",
    "process_tree_rss",
]


class DeclaredProbe:
    """Devices declared in `[devices.X]`.

    cpu: total = the configured memory (host RAM when unset), utilization = host CPU use (None
    on the first snapshot, which has nothing to compare with), used/free None: the scheduler
    accounts cpu devices by reservation and measures each instance with `process_tree_rss`.
    gpu: the reading of the discovered GPU (passed in as `discovered`) with the declared `uuid`,
    or, for a gpu named by an NVML index ("0", "1", ...) without a uuid, of that index; under
    the declared name. A configured memory caps its total (the budget), used/free stay as
    measured. Down when no discovered GPU matches.
    """

    def __init__(self, devices: Mapping[str, DeclaredDevice], *, timeout: float = 5.0) -> None:
        self._devices = dict(devices)
        self._timeout = timeout
        self._host_total: int | None = None
        self._cpu = CpuUse()

    async def snapshot(
        self, discovered: Mapping[str, DeviceSnapshot] | None = None
    ) -> dict[str, DeviceSnapshot]:
        """Reads the declared devices; gpus are looked up by uuid (else index) in `discovered`."""
        utilization = None
        if any(device.kind == "cpu" for device in self._devices.values()):
            # /proc reads go to a thread too; a stuck one leaves utilization unknown.
            with anyio.move_on_after(self._timeout):
                utilization = await anyio.to_thread.run_sync(
                    self._read_host, abandon_on_cancel=True
                )
        gpus = list((discovered or {}).values())
        result: dict[str, DeviceSnapshot] = {}
        for name, device in self._devices.items():
            if device.kind == "cpu":
                total = device.memory if device.memory is not None else self._host_total or 0
                result[name] = unmeasured(
                    name, "cpu", up=True, total=total, utilization=utilization
                )
            else:
                result[name] = _declared_gpu(name, device, gpus)
        return result

    def _read_host(self) -> float | None:
        self._host_total = host_memory_total()
        return self._cpu.read()


def _declared_gpu(
    name: str, device: DeclaredDevice, discovered: list[DeviceSnapshot]
) -> DeviceSnapshot:
    """A declared gpu: the discovered GPU with its uuid, else the one of the NVML index it is
    named by (`[devices."0"] memory = ...` puts a budget on a GPU that needs no declaration)."""
    if device.uuid is not None:
        uuid = device.uuid.lower()
        gpu = next((s for s in discovered if (s.uuid or "").lower() == uuid), None)
        if gpu is None:
            error = f"no GPU with uuid {device.uuid} found through NVML"
            return unmeasured(name, "gpu", error=error, uuid=device.uuid)
    elif name.isascii() and name.isdigit():
        index = int(name)
        gpu = next((s for s in discovered if s.index == index), None)
        if gpu is None:
            error = f"no GPU with NVML index {index} found ({len(discovered)} discovered)"
            return unmeasured(name, "gpu", error=error, index=index)
    else:  # the config refuses this; a probe must not raise for it
        error = 'a declared gpu needs uuid= or an NVML index as its name ("0", "1", ...)'
        return unmeasured(name, "gpu", error=error)
    total = gpu.total if device.memory is None else min(gpu.total, device.memory)
    return replace(gpu, name=name, total=total)


class CompositeProbe:
    """NVML's GPUs plus the declared devices: what the scheduler, metrics and alerts see.

    A GPU claimed by a declared device (by uuid or index) is listed only under the declared
    name.
    """

    def __init__(self, gpus: DeviceProbe, declared: DeclaredProbe) -> None:
        self._gpus = gpus
        self._declared = declared

    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        """Reads every device; never raises for a device problem."""
        discovered = await self._gpus.snapshot()
        declared = await self._declared.snapshot(discovered)
        # Claimed even while down, so that a stuck GPU is not listed under two names.
        claimed = {s.uuid.lower() for s in declared.values() if s.kind == "gpu" and s.uuid}
        merged = {n: s for n, s in discovered.items() if (s.uuid or "").lower() not in claimed}
        merged.update(declared)
        return merged


def process_tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants; 0 when it is gone. Blocking."""
    import psutil  # on first use: an import the daemon's start does without

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # includes ZombieProcess
        return 0
    total = 0
    for process in family:
        # Processes exit while we walk the tree; a vanished one holds no memory.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += int(process.memory_info().rss)
    return total


def process_tree_pss(pid: int) -> int:
    """PSS in bytes of a process and all its descendants (each shared page split among the
    processes that map it, so pages the engine's processes share count once in the sum,
    which RSS counts once per process); 0 when it is gone. A process whose
    /proc/PID/smaps_rollup cannot be read (Linux < 4.14, no permission) counts its RSS.
    Blocking."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in family:
        pss = _pss(process.pid)
        if pss is None:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                pss = int(process.memory_info().rss)
        total += pss or 0
    return total


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def measure_pss(pid: int) -> int:
    """`process_tree_pss` in a worker thread (it reads /proc)."""
    return await anyio.to_thread.run_sync(process_tree_pss, pid)


async def measure_rss(pid: int) -> int:
    """`process_tree_rss` in a worker thread (it reads /proc)."""
    return await anyio.to_thread.run_sync(process_tree_rss, pid)
