"""GPUs through NVML: the only module of vllmd that calls it.

Every NVML call runs in a worker thread under a deadline: a wedged GPU or driver can block a
call for minutes, and the event loop (and with it systemd's watchdog) must keep running, so a
device that does not answer is reported down.

Memory is CUDA's view of it, the one vLLM sizes itself against: NVML's v2 memory info
(`nvmlDeviceGetMemoryInfo_v2`) gives the memory the driver and firmware reserve apart, and
CUDA's total is `total - reserved` (v1's total and used include that part; CUDA never offers
it). A driver without the v2 entry point gets v1, with the reserved part derived from the
lowest `used - every process's memory` seen on that GPU (an idle reading is exact), said once
in the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import sys
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import structlog

from vllmd.devices.snapshot import DeviceSnapshot, GpuProcess, unmeasured
from vllmd.errors import NvmlUnavailable

T = TypeVar("T")

_LIBRARY = "libnvidia-ml.so.1"
# NVML's "not available" for a process's memory (WDDM, no permission). Recent pynvml turns it
# into None itself; older versions pass the raw value through.
_NOT_AVAILABLE = 2**64 - 1
# Newest first: older drivers lack the newer entry points, older pynvml lacks the wrappers.
_PROCESS_CALLS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)


# A MIG GPU's memory and process queries on its parent handle are aggregates or need
# privileges, and vLLM fails on MIG UUIDs (vllm#41848): such a GPU is reported, never used.
MIG_REASON = (
    "MIG mode is enabled: vllmd does not place models on MIG GPUs (`nvidia-smi -i N -mig 0` "
    "turns it off)"
)


class _Failed(Exception):
    """A device read failed or timed out; the message says why."""


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
        # v1 drivers: the reserved part per index, the lowest unattributed use seen.
        self._v1_reserved: dict[int, int] = {}
        self._v1_said: set[int] = set()

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
                readings[index] = unmeasured(
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
            readings[index] = unmeasured(str(index), "gpu", error=str(exc), uuid=uuid, index=index)
        else:
            if reading.reserved is None:
                reading = self._from_v1(reading, index)
            self._known[index] = readings[index] = reading

    def _from_v1(self, reading: DeviceSnapshot, index: int) -> DeviceSnapshot:
        """A v1 reading in CUDA's terms: the reserved part taken out of total and used."""
        assert reading.used is not None
        known = [p.used_bytes for p in reading.processes]
        # Only a complete process list says what is unattributed (not one NVML cannot give).
        if reading.processes_listed and all(b is not None for b in known):
            unattributed = max(0, reading.used - sum(b for b in known if b is not None))
            self._v1_reserved[index] = min(self._v1_reserved.get(index, unattributed), unattributed)
        reserved = self._v1_reserved.get(index, 0)
        if index not in self._v1_said:
            self._v1_said.add(index)
            self._log.warning(
                "nvml_memory_v1",
                device=reading.name,
                reserved_bytes=reserved,
                reason="the driver has no v2 memory info: the memory it reserves is derived from "
                "used minus every process's memory (exact when the GPU is idle)",
            )
        total = reading.total - reserved
        return dataclasses.replace(
            reading,
            total=total,
            device_total=total,
            used=max(0, reading.used - reserved),
            reserved=reserved,
        )

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
            _load_library()
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


def _load_library() -> None:
    """Loads the library pynvml would load, or raises NvmlUnavailable as pynvml's nvmlInit
    would. Tried before pynvml is imported: that import alone (a 5,000-line module and
    ctypes.util) would be paid by every start on hosts without the driver, only to fail."""
    if not sys.platform.startswith("linux"):
        return  # pynvml looks in other places elsewhere: let it
    try:
        ctypes.CDLL(_LIBRARY)  # pynvml's own name for it; loaded once, pynvml then reuses it
    except OSError as exc:
        raise NvmlUnavailable(f"NVMLError_LibraryNotFound: {exc}") from exc


def _read_gpu(nvml: Any, index: int) -> DeviceSnapshot:
    """Reads one GPU (blocking). NotSupported fields become None (a process list: () with
    processes_listed False, never "no process"); other errors propagate."""
    unsupported: list[str] = []

    def optional(field: str, read: Callable[[], float]) -> float | None:
        try:
            return read()
        except nvml.NVMLError_NotSupported:
            unsupported.append(field)
            return None

    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    uuid = nvml.nvmlDeviceGetUUID(handle)
    if _mig_enabled(nvml, handle):
        return unmeasured(
            str(index),
            "gpu",
            error=MIG_REASON,
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            index=index,
        )
    total, used, free, reserved = _memory_info(nvml, handle)
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
    product = _product(nvml, handle)
    return DeviceSnapshot(
        name=str(index),
        kind="gpu",
        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
        index=index,
        total=total,
        device_total=total,
        used=used,
        free=free,
        reserved=reserved,
        utilization=utilization,
        temperature=temperature,
        power=power,
        processes=processes or (),
        up=True,
        error=f"unsupported: {', '.join(unsupported)}" if unsupported else None,
        product=product,
        processes_listed=processes is not None,
    )


def _product(nvml: Any, handle: object) -> str | None:
    """The GPU's product name (nvmlDeviceGetName); None where NVML cannot say."""
    try:
        name = nvml.nvmlDeviceGetName(handle)
    except nvml.NVMLError:
        return None
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _mig_enabled(nvml: Any, handle: object) -> bool:
    """Whether the GPU is in MIG mode (False where MIG does not exist: pre-Ampere GPUs, old
    drivers or pynvml)."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except (AttributeError, nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
        return False
    return bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))


def _memory_info(nvml: Any, handle: object) -> tuple[int, int, int, int | None]:
    """CUDA's total, used and free memory, and the driver's reserved part (v2). Without the
    v2 entry point: v1's figures as they are and None, for the probe to derive the rest."""
    missing = (
        AttributeError,  # a pynvml without nvmlMemory_v2
        TypeError,  # a pynvml whose nvmlDeviceGetMemoryInfo takes no version
        nvml.NVMLError_FunctionNotFound,
        nvml.NVMLError_NotSupported,
        getattr(nvml, "NVMLLibraryMismatchError", AttributeError),
    )
    try:
        v2 = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except missing:
        v1 = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(v1.total), int(v1.used), int(v1.free), None
    reserved = int(v2.reserved)
    return int(v2.total) - reserved, int(v2.used), int(v2.free), reserved


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
