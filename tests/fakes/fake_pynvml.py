"""A fake `pynvml` module for tests: GPUs described by FakeGpu, NVML's errors and constants.

Injected with `NvmlProbe(nvml=FakeNvml(...))`. Errors are modelled on nvidia-ml-py 13: an
NVMLError with `.value` (the NVML return code) and one subclass per code.

Memory info follows NVML's two structures (nvml.h, `nvmlMemory_t` and `nvmlMemory_v2_t`;
pynvml's `nvmlDeviceGetMemoryInfo(handle, version=None)`):
- v1 (`version=None`): `total` is the whole device and `used` includes the memory the driver
  and firmware reserve ("Sum of Reserved and Allocated device memory"), which CUDA never
  offers (an idle A100 reads ~900 MB used in v1, ~8 MB in v2);
- v2 (`version=nvmlMemory_v2`, the `nvmlDeviceGetMemoryInfo_v2` entry point): `total`,
  `reserved`, `free`, `used` apart, `used` being allocated memory only. A driver without
  that entry point answers NVML_ERROR_FUNCTION_NOT_FOUND (pynvml's
  `_nvmlGetFunctionPointer`), as `memory_v2=False` does here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Literal

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_TEMPERATURE_GPU = 0
NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE_ulonglong
nvmlMemory_v2 = 0x02000028  # pynvml's constant: sizeof(nvmlMemory_v2_t) | 2 << 24
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    value = 999  # NVML_ERROR_UNKNOWN

    def __str__(self) -> str:
        return f"NVML error {self.value}"


class NVMLError_Uninitialized(NVMLError):
    value = NVML_ERROR_UNINITIALIZED


class NVMLError_NotSupported(NVMLError):
    value = NVML_ERROR_NOT_SUPPORTED


class NVMLError_DriverNotLoaded(NVMLError):
    value = NVML_ERROR_DRIVER_NOT_LOADED


class NVMLError_LibraryNotFound(NVMLError):
    value = NVML_ERROR_LIBRARY_NOT_FOUND


class NVMLError_FunctionNotFound(NVMLError):
    value = NVML_ERROR_FUNCTION_NOT_FOUND


class NVMLError_GpuIsLost(NVMLError):
    value = NVML_ERROR_GPU_IS_LOST


@dataclass
class FakeGpu:
    """One GPU. `unsupported` names fields that raise NotSupported; `hang` blocks memory reads
    until set; `error` is raised by every call after the uuid."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * 2**30
    used: int = 2**30  # allocated (v2's `used`); v1 adds `reserved` to it
    reserved: int = 0  # the driver's and firmware's: outside CUDA's total
    mig: bool = False  # MIG mode on (nvmlDeviceGetMigMode's current mode); "mig" in
    # `unsupported`: a GPU without MIG (NVML_ERROR_NOT_SUPPORTED, as pre-Ampere GPUs answer)
    utilization_percent: int = 0
    temperature: int = 40
    power_milliwatts: int = 100_000
    processes: Sequence[tuple[int, int | None]] = ()
    unsupported: frozenset[str] = frozenset()
    hang: threading.Event | None = None
    error: type[NVMLError] | None = None
    memory_calls: int = 0


ProcessCall = Callable[["FakeGpu"], list[SimpleNamespace]]


class FakeNvml(ModuleType):
    """The module. `driver` picks the compute-process entry points that work: "v3" (all),
    "v2" (_v3 raises FunctionNotFound, like an older driver), "plain" (an old pynvml without
    the _v3/_v2 wrappers, returning NVML's raw not-available value)."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE

    def __init__(
        self,
        gpus: Sequence[FakeGpu] = (),
        *,
        init_error: type[Exception] | None = None,
        driver: Literal["v3", "v2", "plain"] = "v3",
        memory_v2: bool = True,
    ) -> None:
        super().__init__("fake_pynvml")
        self.gpus = list(gpus)
        self.init_error = init_error
        self.count_hang: threading.Event | None = None  # blocks discovery until set
        self.init_threads: list[int] = []
        self.shutdowns = 0
        self.memory_v2 = memory_v2
        self.nvmlMemory_v2 = nvmlMemory_v2
        # Set per instance so that "plain" can leave the _v3/_v2 attributes out altogether.
        if driver in ("v3", "v2"):
            v3: ProcessCall = self._processes if driver == "v3" else self._function_not_found
            self.nvmlDeviceGetComputeRunningProcesses_v3 = v3
            self.nvmlDeviceGetComputeRunningProcesses_v2: ProcessCall = self._processes
        raw = driver == "plain"
        self.nvmlDeviceGetComputeRunningProcesses: ProcessCall = lambda gpu: self._processes(
            gpu, raw=raw
        )

    def nvmlInit(self) -> None:
        self.init_threads.append(threading.get_ident())
        if self.init_error is not None:
            raise self.init_error()

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        if self.count_hang is not None:
            self.count_hang.wait(timeout=30)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        self._check(gpu, "name")
        return gpu.name

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu, version: int | None = None) -> SimpleNamespace:
        gpu.memory_calls += 1
        if gpu.hang is not None:
            gpu.hang.wait(timeout=30)  # bounded, so a failed test cannot hang the run
        self._check(gpu, "memory")
        free = gpu.total - gpu.reserved - gpu.used
        if not version:
            return SimpleNamespace(total=gpu.total, used=gpu.used + gpu.reserved, free=free)
        if not self.memory_v2:
            raise NVMLError_FunctionNotFound()
        assert version == nvmlMemory_v2, version
        return SimpleNamespace(
            version=version, total=gpu.total, reserved=gpu.reserved, free=free, used=gpu.used
        )

    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> list[int]:
        """[current, pending], as pynvml returns them."""
        self._check(gpu, "mig")
        mode = NVML_DEVICE_MIG_ENABLE if gpu.mig else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> SimpleNamespace:
        self._check(gpu, "utilization")
        return SimpleNamespace(gpu=gpu.utilization_percent, memory=0)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        self._check(gpu, "temperature")
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._check(gpu, "power")
        return gpu.power_milliwatts

    def _processes(self, gpu: FakeGpu, *, raw: bool = False) -> list[SimpleNamespace]:
        self._check(gpu, "processes")
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=NOT_AVAILABLE if used is None and raw else used)
            for pid, used in gpu.processes
        ]

    def _function_not_found(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        raise NVMLError_FunctionNotFound()

    @staticmethod
    def _check(gpu: FakeGpu, field: str) -> None:
        if gpu.error is not None:
            raise gpu.error()
        if field in gpu.unsupported:
            raise NVMLError_NotSupported()
