"""`vllmd`: the daemon's command line. The only place that turns errors into exit codes.

The console script is vllmd.cli.entry, which keeps optional extras out and the collector off
before this module's imports run; importing this module itself changes nothing."""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import structlog

from vllmd import __version__
from vllmd.cli.render import plan_text
from vllmd.config import Config, ModelConfig, check_config, check_devices, load_config, read_devices
from vllmd.daemon import serve as serve_daemon
from vllmd.devices import DeviceSnapshot
from vllmd.errors import ConfigError, VllmdError
from vllmd.log import configure
from vllmd.placement.overheads import expected_overhead
from vllmd.placement.plan import build_plan
from vllmd.placement.reservation import reservation
from vllmd.store import recorded_footprints

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DEFAULT_CONFIG = Path("/etc/vllmd/vllmd.toml")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllmd", description="The vLLM supervisor daemon.")
    p.add_argument("--version", action="version", version=f"vllmd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="config file (%(default)s)"
    )
    serve.add_argument(
        "--log-format",
        choices=["json", "console"],
        default=None,
        help="log format (default: console on a terminal, else json)",
    )
    check = sub.add_parser(
        "check-config", help="validate a config file (exit 0, or 2 with the problems)"
    )
    check.add_argument("path", type=Path)
    check.add_argument(
        "--plan",
        action="store_true",
        help="print the plan instead of ok: each model's memory in its parts, which fit together",
    )
    check.add_argument("--json", action="store_true", help="the plan as JSON (with --plan)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "check-config":
        gc.enable()
        problems = check_config(args.path)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            return EXIT_CONFIG
        if args.plan:
            plan = offline_plan(load_config(args.path))
            print(json.dumps(plan, indent=2) if args.json else plan_text(plan))
        else:
            print(f"{args.path}: ok")
        return EXIT_OK
    return serve(args.config, args.log_format)


def offline_plan(config: Config) -> dict[str, Any]:
    """The plan with the daemon down: device totals read now (NVML, the declared devices),
    footprints as the state store last recorded them (none where it cannot be read)."""
    devices = anyio.run(lambda: read_devices(config))
    totals = {name: d.total or None for name, d in devices.items() if d.up}
    recorded = recorded_footprints(config.daemon.state_dir)
    reserved = {}
    for name, model in config.models.items():
        gpus = sum(_kind(config, devices, d) == "gpu" for d in model.devices)
        overhead = expected_overhead(recorded.overheads.get(name), gpus, None, config.engine)
        reserved[name] = _reservation(model, overhead)
    return build_plan(config, totals, recorded.footprints, reserved)


def _reservation(model: ModelConfig, overhead: int) -> int:
    return reservation(model, lambda: overhead)


def _kind(config: Config, devices: Mapping[str, DeviceSnapshot], name: str) -> str:
    declared = config.devices.get(name)
    return declared.kind if declared else devices[name].kind if name in devices else "gpu"


def serve(path: Path, log_format: str | None) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    # A model larger than a GPU present now could never run (no driver: nothing to check).
    problems = check_devices(config)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    configure(
        config.daemon.log_level,
        "json" if log_format == "json" else "console" if log_format else None,
    )
    # The gateway allocates hundreds of short-lived objects per request: with CPython's
    # default thresholds the collector takes a large share of the daemon's CPU under load
    # and pauses it for full passes over every module's objects (docs/performance.md). What
    # exists now lives as long as the daemon: frozen out of collections; young ones rarer.
    gc.freeze()
    gc.set_threshold(7000, 20, 100)
    gc.enable()
    failures: list[BaseException] = []
    try:
        return anyio.run(_run, config, backend_options={"use_uvloop": True})
    # Task groups wrap what is raised in them: a plain `except OSError` would never match.
    except* (VllmdError, OSError) as group:
        failures = _leaves(group)
    log = structlog.get_logger("vllmd")
    for failure in failures:
        log.error("runtime_failure", error=str(failure))
    return EXIT_FAILURE


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


async def _run(config: Config) -> int:
    first, second = anyio.Event(), anyio.Event()
    forced = False

    async def on_signals() -> None:
        nonlocal forced
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                if first.is_set():
                    forced = True
                    second.set()
                    return
                first.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signals)
        await serve_daemon(config, first.wait, force=second.wait)
        tg.cancel_scope.cancel()
    return EXIT_FAILURE if forced else EXIT_OK


if __name__ == "__main__":
    # Run as a script, this module's imports would come before the entry module's steps.
    sys.exit("run `vllmd`, or `python -m vllmd.cli.entry`: vllmd.cli.vllmd is not a script")
