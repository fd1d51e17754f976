"""Checks of a valid config against this host's devices as they are now.

Kept out of parsing, which stays pure (a file means the same on every host and in every test):
these need one device reading, taken by `vllmd check-config` and at `vllmd serve` start. A
device that cannot be read (no NVIDIA driver, a GPU down or hung) is not checked: it may come
up later, and the scheduler then keeps such a model waiting rather than starting it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import ModuleType

import anyio
import structlog

from vllmd.config.schema import Config
from vllmd.config.sizing import too_long
from vllmd.devices import CompositeProbe, DeclaredProbe, DeviceSnapshot, NvmlProbe
from vllmd.units import format_size


def device_problems(config: Config, devices: Mapping[str, DeviceSnapshot]) -> list[str]:
    """One `key.path: message` line per model that could never run on `devices` (a reading of
    NVML and the declared devices, by device name): its memory exceeds a GPU's total minus the
    headroom. Devices missing from `devices` or down are skipped."""
    headroom = config.scheduler.headroom
    problems = []
    for model in config.models.values():
        for name in model.devices:
            device = devices.get(name)
            if device is None or not device.up or device.kind != "gpu" or device.total <= 0:
                continue
            declared = config.devices.get(name)
            if declared is not None and declared.memory == device.total:
                continue  # the declared budget is the total (under NVML's): parsing checked it
            if model.sizing is not None:
                problem = too_long(model, name, device.total - headroom)
                if problem:
                    problems.append(problem + " (measured through NVML)")
            elif model.memory > device.total - headroom:
                problems.append(
                    f"models.{model.name}.memory: {format_size(model.memory)} exceeds device "
                    f'"{name}" total {format_size(device.total)} - headroom '
                    f"{format_size(headroom)} (measured through NVML)"
                )
    return problems


async def read_devices(
    config: Config, *, nvml: ModuleType | None = None, timeout: float = 5.0
) -> dict[str, DeviceSnapshot]:
    """One silent reading of the GPUs that `config`'s models are placed on; {} when no model is
    on a GPU or NVML cannot be used (no driver). `nvml` replaces pynvml (tests)."""
    gpus = {name: d for name, d in config.devices.items() if d.kind == "gpu"}
    on_gpu = any(
        name in gpus or (name not in config.devices and name.isdigit())
        for model in config.models.values()
        for name in model.devices
    )
    if not on_gpu:
        return {}
    # Its own processors and a logger that prints nothing: no driver must not say a word.
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    )
    nvml_probe = NvmlProbe(nvml, timeout=timeout, log=log)
    try:
        return await CompositeProbe(nvml_probe, DeclaredProbe(gpus, timeout=timeout)).snapshot()
    finally:
        nvml_probe.close()


def check_devices(config: Config, *, nvml: ModuleType | None = None) -> list[str]:
    """`device_problems` for a fresh reading of this host's devices. Runs its own event loop:
    call it before the daemon's starts (never from async code; there, await `read_devices`)."""
    devices = anyio.run(lambda: read_devices(config, nvml=nvml))
    return device_problems(config, devices)
