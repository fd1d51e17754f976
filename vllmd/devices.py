"""Devices: GPUs discovered through NVML, devices declared in `[devices.X]`, process memory.

The only module of vllmd that touches NVML. Every NVML call runs in a worker thread under a
deadline: a wedged GPU or driver can block a call for minutes, and the event loop (and with it
systemd's watchdog) must keep running, so a device that does not answer is reported down.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Literal, Protocol, TypeVar

import anyio
import anyio.to_thread
import psutil
import structlog

from vllmd.errors import DeviceError

T = TypeVar("T")

# NVML's "not available" for a process's memory (WDDM, no permission). Recent pynvml turns it
# into None itself; older versions pass the raw value through.
_NOT_AVAILABLE = 2**64 - 1
# Newest first: older drivers lack the newer entry points, older pynvml lacks the wrappers.
_PROCESS_CALLS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process on a GPU; `used_bytes` is None when NVML cannot tell."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """One device at one moment. Measured fields are None when unknown; sizes in bytes.

    `total` is what vllmd may use (a declared `memory` caps it); `device_total` is the GPU's
    own size as NVML reports it, the base of vLLM's `--gpu-memory-utilization` fraction (None
    for a cpu or an unread GPU).
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


class NvmlUnavailable(DeviceError):
    """NVML cannot be used on this host: pynvml, libnvidia-ml or the driver is missing."""


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


class _Failed(Exception):
    """A device read failed or timed out; the message says why."""


def _unmeasured(
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


class NvmlProbe:
    """GPUs discovered through NVML, named by their NVML index ("0", "1", ...).

    `snapshot()` never raises: without a driver it returns {} (and says so once in the log); a
    device whose calls fail or outlast `timeout` is returned with up=False. A call that hangs
    keeps its thread; that device is not asked again until the call returns, so a wedged GPU
    costs one thread, not one per snapshot.
    """

    def __init__(
        self,
        nvml: ModuleType | None = None,
        *,
        timeout: float = 5.0,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._nvml = nvml  # None: import pynvml on first use, in the worker thread
        self._timeout = timeout
        self._log = log if log is not None else structlog.get_logger(__name__)
        self._lock = threading.Lock()
        # Scheduler, metrics and alerts may ask at once; without this, the second caller
        # would find the first one's calls in flight and report every GPU down.
        self._snapshot_lock = anyio.Lock()
        self._busy: set[str] = set()  # keys of calls still running in a worker thread
        self._initialised = False
        self._unavailable = False
        self._known: dict[int, DeviceSnapshot] = {}  # last good reading per index
        self._down: set[str] = set()  # to log a device going down or up once, not every time
        self._discovery_failing = False

    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        """Reads every GPU; takes at most `timeout` seconds (plus the wait for a concurrent
        caller's snapshot)."""
        async with self._snapshot_lock:
            return await self._snapshot()

    async def _snapshot(self) -> dict[str, DeviceSnapshot]:
        if self._unavailable:
            return {}
        deadline = anyio.current_time() + self._timeout
        readings: dict[int, DeviceSnapshot] = {}
        try:
            count = await self._in_thread("discovery", deadline, self._init_and_count)
        except NvmlUnavailable as exc:
            self._unavailable = True
            self._log.warning("no NVIDIA driver: only declared devices are used", reason=str(exc))
            return {}
        except _Failed as exc:
            if not self._discovery_failing:  # retried every snapshot, logged once
                self._log.warning("gpu discovery failed", error=str(exc))
            self._discovery_failing = True
            # Without a count the devices seen before are all that is known: report them down.
            for index, known in self._known.items():
                readings[index] = _unmeasured(
                    known.name, "gpu", error=str(exc), uuid=known.uuid, index=index
                )
        else:
            self._discovery_failing = False
            async with anyio.create_task_group() as tg:
                for index in range(count):
                    tg.start_soon(self._read_into, readings, index, deadline)
        self._log_changes(readings.values())
        return {readings[index].name: readings[index] for index in sorted(readings)}

    def close(self) -> None:
        """Shuts NVML down if it was initialised (skipped while a call hangs: it would too)."""
        with self._lock:
            busy = bool(self._busy)
        if self._initialised and not busy and self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._initialised = False

    async def _read_into(
        self, readings: dict[int, DeviceSnapshot], index: int, deadline: float
    ) -> None:
        nvml = self._nvml
        try:
            reading = await self._in_thread(
                f"gpu {index}", deadline, lambda: _read_gpu(nvml, index)
            )
        except _Failed as exc:
            known = self._known.get(index)
            uuid = known.uuid if known is not None else None
            readings[index] = _unmeasured(str(index), "gpu", error=str(exc), uuid=uuid, index=index)
        else:
            self._known[index] = readings[index] = reading

    async def _in_thread(self, key: str, deadline: float, call: Callable[[], T]) -> T:
        """Runs a blocking NVML call in a worker thread; failures become _Failed."""
        with self._lock:
            if key in self._busy:
                raise _Failed("an earlier NVML call has not returned yet")

        def run() -> T:
            # Marked busy only once running: a call abandoned before it starts never runs.
            with self._lock:
                self._busy.add(key)
            try:
                return call()
            finally:
                with self._lock:
                    self._busy.discard(key)

        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except TimeoutError:
            raise _Failed(f"NVML did not answer within {self._timeout:g} s") from None
        except NvmlUnavailable:
            raise
        except Exception as exc:  # any NVML error (or pynvml surprise) downs the device only
            raise _Failed(f"NVML: {type(exc).__name__}: {exc}") from exc

    def _init_and_count(self) -> int:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise NvmlUnavailable("the nvidia-ml-py package is not installed") from exc
        nvml = self._nvml
        if not self._initialised:  # only this thread inits: the "discovery" key is busy
            try:
                nvml.nvmlInit()
            except (nvml.NVMLError_LibraryNotFound, nvml.NVMLError_DriverNotLoaded) as exc:
                raise NvmlUnavailable(f"{type(exc).__name__}: {exc}") from exc
            self._initialised = True
        return int(nvml.nvmlDeviceGetCount())

    def _log_changes(self, readings: Iterable[DeviceSnapshot]) -> None:
        for reading in readings:
            if not reading.up and reading.name not in self._down:
                self._down.add(reading.name)
                self._log.warning("gpu down", device=reading.name, error=reading.error)
            elif reading.up and reading.name in self._down:
                self._down.discard(reading.name)
                self._log.info("gpu up", device=reading.name)


def _read_gpu(nvml: Any, index: int) -> DeviceSnapshot:
    """Reads one GPU (blocking). NotSupported fields become None; other errors propagate."""
    unsupported: list[str] = []

    def optional(field: str, read: Callable[[], float]) -> float | None:
        try:
            return read()
        except nvml.NVMLError_NotSupported:
            unsupported.append(field)
            return None

    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    uuid = nvml.nvmlDeviceGetUUID(handle)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = optional(
        "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
    )
    temperature = optional(
        "temperature",
        lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
    )
    power = optional("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000)  # milliwatts
    processes = _compute_processes(nvml, handle)
    if processes is None:
        unsupported.append("processes")
    return DeviceSnapshot(
        name=str(index),
        kind="gpu",
        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
        index=index,
        total=int(memory.total),
        device_total=int(memory.total),
        used=int(memory.used),
        free=int(memory.free),
        utilization=utilization,
        temperature=temperature,
        power=power,
        processes=processes or (),
        up=True,
        error=f"unsupported: {', '.join(unsupported)}" if unsupported else None,
    )


def _compute_processes(nvml: Any, handle: object) -> tuple[GpuProcess, ...] | None:
    """The GPU's compute processes, or None when no entry point works on this driver."""
    # pynvml's unversioned wrapper reports a missing function as NVMLLibraryMismatchError.
    missing = (
        AttributeError,
        nvml.NVMLError_FunctionNotFound,
        getattr(nvml, "NVMLLibraryMismatchError", AttributeError),
    )
    for name in _PROCESS_CALLS:
        try:
            infos = getattr(nvml, name)(handle)
        except missing:
            continue
        except nvml.NVMLError_NotSupported:
            return None
        return tuple(
            GpuProcess(
                pid=int(info.pid),
                used_bytes=None
                if info.usedGpuMemory in (None, _NOT_AVAILABLE)
                else int(info.usedGpuMemory),
            )
            for info in infos
        )
    return None


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
        self._cpu_primed = False

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
                result[name] = _unmeasured(
                    name, "cpu", up=True, total=total, utilization=utilization
                )
            else:
                result[name] = _declared_gpu(name, device, gpus)
        return result

    def _read_host(self) -> float | None:
        self._host_total = int(psutil.virtual_memory().total)
        # cpu_percent(None) measures since its previous call; the first one means nothing.
        percent = float(psutil.cpu_percent(interval=None))
        primed, self._cpu_primed = self._cpu_primed, True
        return percent / 100 if primed else None


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
            return _unmeasured(name, "gpu", error=error, uuid=device.uuid)
    elif name.isascii() and name.isdigit():
        index = int(name)
        gpu = next((s for s in discovered if s.index == index), None)
        if gpu is None:
            error = f"no GPU with NVML index {index} found ({len(discovered)} discovered)"
            return _unmeasured(name, "gpu", error=error, index=index)
    else:  # the config refuses this; a probe must not raise for it
        error = 'a declared gpu needs uuid= or an NVML index as its name ("0", "1", ...)'
        return _unmeasured(name, "gpu", error=error)
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


async def measure_rss(pid: int) -> int:
    """`process_tree_rss` in a worker thread (it reads /proc)."""
    return await anyio.to_thread.run_sync(process_tree_rss, pid)
