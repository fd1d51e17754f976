"""memory = "auto": each such model sized from its files once its devices are known.

The files are looked for where the engine will look: a local directory, or the HF cache that
the engine's environment names (the daemon's environment, engine.env, the model's env). A hub
id that is not downloaded yet is no config error: the model keeps memory 0 and `unsized` says
why (vllmctl doctor warns; a start is refused naming models.X.memory). An architecture the
estimator cannot size, or a length that can never fit the model's devices, is one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import structlog

from vllmd.config.schema import Config, DeviceConfig, EngineConfig, ModelConfig
from vllmd.errors import ModelUnavailable
from vllmd.sizing import Settings, Sizing, Unsized, read_shape
from vllmd.units import format_size
from vllmd.weights import CPU_ENGINE_FIXED_COST, weights_bytes

log = structlog.get_logger("vllmd.config")


def size_models(
    models: Mapping[str, ModelConfig],
    devices: Mapping[str, DeviceConfig],
    engine: EngineConfig,
    headroom: int,
    problems: list[str],
    environ: Mapping[str, str] | None = None,
) -> dict[str, ModelConfig]:
    """`models` with every "auto" model's memory set to its estimate (or its `unsized` reason).
    `environ` is the daemon's environment (default: this process's)."""
    base = os.environ if environ is None else environ
    sized = dict(models)
    for name, model in models.items():
        if model.memory_auto and model.model:  # (no model: reported already)
            sized[name] = size_model(model, devices, engine, headroom, problems, base)
    return sized


def size_model(
    model: ModelConfig,
    devices: Mapping[str, DeviceConfig],
    engine: EngineConfig,
    headroom: int,
    problems: list[str],
    base_env: Mapping[str, str],
) -> ModelConfig:
    kinds = {devices[d].kind if d in devices else "gpu" for d in model.devices}
    if len(kinds) != 1:
        return model  # a mix of cpu and gpu is reported by check_models
    gpu = kinds == {"gpu"}
    environ = {**base_env, **engine.env, **model.env}
    key = f"models.{model.name}"
    try:
        shape = read_shape(model.model, environ)
    except Unsized as exc:
        problems.append(f"{key}.memory: cannot estimate {model.model}: {exc}; set memory")
        return model
    if shape is None and _unsizable(model.model):
        problems.append(
            f"{key}.memory: cannot estimate {model.model}: no config.json (a GGUF file or a "
            "Mistral-format checkpoint); set memory"
        )
        return model
    files = weights_bytes(model.model, environ) if shape is not None else None
    if shape is None or not files:  # (0: a directory without weight files, not copied yet)
        where = "directory" if os.path.isabs(model.model) else "HF cache"
        return replace(model, unsized=f"{model.model} is not in the engine's {where} yet")
    settings = _settings(model, engine, gpu)
    try:
        sizing = Sizing.of(shape, files, settings)
    except ValueError as exc:
        which = "max_model_len" if "max_model_len" in str(exc) else "memory"
        problems.append(f"{key}.{which}: cannot estimate {model.model}: {exc}")
        return model
    sized = replace(model, memory=sizing.estimate.total, sizing=sizing)
    problem = _never_fits(sized, devices, headroom)
    if problem:
        problems.append(problem)
    return sized


def _settings(model: ModelConfig, engine: EngineConfig, gpu: bool) -> Settings:
    return Settings(
        dtype=model.dtype,
        max_model_len=model.max_model_len,
        kv_sequences=model.kv_sequences,
        devices=len(model.devices),
        gpu=gpu,
        overhead=engine.first_overhead(len(model.devices)) if gpu else CPU_ENGINE_FIXED_COST,
    ).with_args(model.args)


def _never_fits(model: ModelConfig, devices: Mapping[str, DeviceConfig], headroom: int) -> str:
    for name in model.devices:
        device = devices.get(name)
        if device is not None and device.memory:
            problem = too_long(model, name, device.memory - headroom)
            if problem:
                return problem
    return ""


def _unsizable(model: str) -> bool:
    """A local checkpoint there in full that has no config.json to size it from."""
    path = Path(model)
    return path.is_file() or (path / "params.json").is_file()


def too_long(model: ModelConfig, device: str, room: int) -> str:
    """For a model sized from its files: the problem when its estimate can never fit `room`
    bytes of `device` (its budget less the headroom), naming the largest length that would."""
    sizing = model.sizing
    if sizing is None or model.memory <= room:
        return ""
    estimate = sizing.estimate
    longest = sizing.largest_len(room)
    fix = (
        f"the largest that fits is {longest}; set max_model_len, or memory"
        if longest
        else "not even the weights and overhead fit: this model needs a larger device"
    )
    need, have = format_size(model.memory), format_size(room)
    if need == have:  # just over: say it to the MiB
        need, have = f"{-(-model.memory // 2**20)}MiB", f"{room // 2**20}MiB"
    return (
        f"models.{model.name}.max_model_len: at {estimate.max_model_len} tokens x "
        f"kv_sequences {estimate.kv_sequences} the estimate {need} can never fit device "
        f'"{device}" ({have} after the headroom); {fix}'
    )


def unsized(model: ModelConfig) -> bool:
    """memory = "auto" and the model could not be sized: no reservation, no start."""
    return model.memory_auto and model.memory <= 0


def keep_sizing(old: Config, new: Config) -> Config:
    """`new` where a model it could not size (its files gone from the cache, a new revision
    half downloaded) keeps what `old` sized, where nothing the estimate rests on changed: its
    config, the settings its sizing was made with (the engine's overhead among them), the
    engine's environment (where the HF cache is), and it still fits its devices. A reload for
    another change must not stop a model that serves, to leave it unstartable."""
    models = dict(new.models)
    for name, model in new.models.items():
        before = old.models.get(name)
        if not unsized(model) or before is None or before.sizing is None:
            continue
        kept = replace(model, memory=before.memory, sizing=before.sizing, unsized="")
        same = kept == replace(before, unsized="") and old.engine.env == new.engine.env
        same = same and _settings(model, new.engine, before.sizing.settings.gpu) == (
            before.sizing.settings
        )
        if same and not _never_fits(kept, new.devices, new.scheduler.headroom):
            log.warning("sizing_kept", model=name, why=model.unsized)
            models[name] = kept
    return replace(new, models=MappingProxyType(models))


def require_sized(model: ModelConfig) -> None:
    """Raises ModelUnavailable (503) for an `unsized` model."""
    if unsized(model):
        raise ModelUnavailable(unsized_message(model))


def unsized_message(model: ModelConfig) -> str:
    """Why a model with memory = "auto" cannot start: its files were not there to size it."""
    return (
        f'models.{model.name}.memory: "auto" cannot size {model.model}: '
        f"{model.unsized or 'its files were not found'}; download it where the engine looks "
        "(its HF_HOME / HF_HUB_CACHE) and reload, or set memory"
    )
