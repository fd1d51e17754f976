"""Reading a config file: TOML -> validated `Config`, or every problem at once."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

from vllmd.config.alerts import parse_alerts
from vllmd.config.cpus import owned_env
from vllmd.config.hardware import check_devices
from vllmd.config.models import check_models, parse_devices, parse_models
from vllmd.config.reader import Table
from vllmd.config.schema import Config
from vllmd.config.sections import (
    parse_daemon,
    parse_engine,
    parse_gateway,
    parse_metrics,
    parse_scheduler,
)
from vllmd.config.sizing import size_models
from vllmd.errors import ConfigError


def load_config(path: Path) -> Config:
    """The config in the TOML file at `path`; relative paths in it resolve against its directory.

    Raises ConfigError with one `key.path: message` line per problem.
    """
    path = Path(path).absolute()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line L, column C)".
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc
    return parse_config(data, path.parent, path)


def parse_config(data: Mapping[str, Any], base_dir: Path, path: Path | None = None) -> Config:
    """The `Config` for already-parsed TOML `data`; relative paths resolve against `base_dir`.

    Raises ConfigError listing every problem found, not just the first.
    """
    problems: list[str] = []
    root = Table(data, "", problems)

    sections = {
        name: root.table(name) or Table({}, name, problems)
        for name in ("daemon", "gateway", "metrics", "engine", "scheduler", "alerts")
    }
    daemon = parse_daemon(sections["daemon"], base_dir)
    gateway = parse_gateway(sections["gateway"], base_dir)
    metrics = parse_metrics(sections["metrics"])
    engine = parse_engine(sections["engine"], base_dir)
    problems += owned_env(engine.env, "engine.env")
    scheduler = parse_scheduler(sections["scheduler"])
    devices = parse_devices(root.table("devices"))
    models = parse_models(root.table("models"), base_dir, engine)
    models = size_models(models, devices, engine, scheduler.headroom, problems)
    check_models(models, devices, engine, scheduler.headroom, problems)
    alerts = parse_alerts(sections["alerts"], models, devices)
    for table in (*sections.values(), root):
        table.finish()
    if problems:
        raise ConfigError(problems)
    return Config(
        path=path,
        daemon=daemon,
        gateway=gateway,
        metrics=metrics,
        engine=engine,
        scheduler=scheduler,
        devices=MappingProxyType(devices),
        models=MappingProxyType(models),
        alerts=alerts,
    )


def check_config(path: Path, *, nvml: ModuleType | None = None) -> list[str]:
    """Every problem in the config file at `path`, then (once it is valid) those of its models
    with this host's GPUs as NVML reads them now (`check_devices`; none without a driver).
    [] when there are none. `nvml` replaces pynvml (tests). Runs its own event loop."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return exc.problems
    return check_devices(config, nvml=nvml)
