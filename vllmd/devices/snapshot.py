"""What a device reading is: one frozen snapshot per device, the totals derived from it, and
the probe protocol (NVML, declared devices, fakes in tests)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process on a GPU; `used_bytes` is None when NVML cannot tell."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """One device at one moment. Measured fields are None when unknown; sizes in bytes.

    `total` is what vllmd may use (a declared `memory` caps it); `device_total` is the GPU's
    own size as CUDA sees it (NVML's total less the part the driver reserves), the base of
    vLLM's `--gpu-memory-utilization` fraction (None for a cpu or an unread GPU); `reserved`
    is that driver part (None only in a v1 reading not yet put in CUDA's terms).
    `processes_listed` is False when the driver cannot list a GPU's compute processes (NVML
    answers NOT_SUPPORTED: some vGPU and cloud drivers, no permission): `processes` is then
    () and says nothing of who uses the GPU, unlike a list that is empty.
    """

    name: str
    kind: Literal["cpu", "gpu"]
    uuid: str | None
    index: int | None
    total: int
    used: int | None
    free: int | None
    utilization: float | None
    temperature: float | None
    power: float | None
    processes: tuple[GpuProcess, ...]
    up: bool
    error: str | None
    device_total: int | None = None
    reserved: int | None = 0
    product: str | None = None  # GPU: NVML's name ("NVIDIA H100 80GB HBM3"), the device type
    processes_listed: bool = True


class DeclaredDevice(Protocol):
    """What this module reads of a `[devices.X]` table (vllmd.config's DeviceConfig)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> Literal["cpu", "gpu"]: ...
    @property
    def memory(self) -> int | None: ...
    @property
    def uuid(self) -> str | None: ...


def budget_total(snap: DeviceSnapshot | None, declared: DeclaredDevice | None) -> int:
    """What vllmd may reserve on a device: its size, capped by a declared `memory` (0 when
    the device is neither seen nor declared with a size)."""
    if snap is None:
        return declared.memory if declared is not None and declared.memory else 0
    if declared is not None and declared.memory:
        return min(snap.total, declared.memory)
    return snap.total


def engine_total(
    snap: DeviceSnapshot | None, declared: DeclaredDevice | None, fallback: int
) -> int:
    """What an engine sizes itself against on a device: a GPU's own size, not a declared
    budget's share of it (vLLM's --gpu-memory-utilization is a fraction of the whole GPU);
    a cpu device's budget. `fallback` (the model's reservation) when nothing is known."""
    if snap is not None:
        return snap.device_total or snap.total
    if declared is not None and declared.memory:
        return declared.memory
    return fallback


class DeviceProbe(Protocol):
    """Anything that reads devices: NVML, declared devices, a fake in tests."""

    async def snapshot(self) -> Mapping[str, DeviceSnapshot]: ...


def unmeasured(
    name: str,
    kind: Literal["cpu", "gpu"],
    *,
    up: bool = False,
    error: str | None = None,
    uuid: str | None = None,
    index: int | None = None,
    total: int = 0,
    utilization: float | None = None,
) -> DeviceSnapshot:
    """A reading without memory measurements: a device that is down, or a declared cpu."""
    return DeviceSnapshot(
        name=name,
        kind=kind,
        uuid=uuid,
        index=index,
        total=total,
        used=None,
        free=None,
        utilization=utilization,
        temperature=None,
        power=None,
        processes=(),
        up=up,
        error=error,
    )
