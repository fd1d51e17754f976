"""`vllmctl doctor`: checks of this host's setup, run in the client (docs/design.md "Control API").

Each check is PASS, WARN (works, but look) or FAIL (vllmd will not work so), with a fix for the
latter two. It runs with the daemon down too: then it reads the config file itself. Writability
is judged as the user running doctor, who may not be the daemon's user: a directory that this
user cannot write is a WARN, a path that can never be a directory (a file in the way) a FAIL.
"""

from __future__ import annotations

import logging
import os
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import psutil
import structlog

from vllmd.cli.check import Check, Status, failed, report
from vllmd.cli.ports import port_checks
from vllmd.config import Config, load_config
from vllmd.config.reader import Table
from vllmd.config.sections import parse_daemon
from vllmd.devices import DeclaredProbe, DeviceSnapshot, NvmlProbe
from vllmd.engine.version import VLLM_VERSION, interpreter, run_python
from vllmd.errors import ConfigError
from vllmd.units import format_size

# The daemon's `no_process_list` finding (vllmd.placement.ledger.NO_PROCESS_LIST), as doctor
# says it from here: the cause (budgeted by reservation), the fix.
UNLISTED = (
    "the driver does not list compute processes (NVML: not supported, as on some vGPU and "
    "cloud drivers, or no permission), so it reports no per-process memory; budgeted by "
    "reservation",
    "nothing to fix in vllmd's unit or container; a driver that lists compute processes "
    "(`nvidia-smi --query-compute-apps=pid,used_memory --format=csv`) gives measured footprints",
)
__all__ = ["Check", "examine", "failed", "report"]
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the trailing NUL
FIND_MODULE = (
    "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 1)"
)


def config_socket(path: Path) -> Path | None:
    """The `daemon.control_socket` of the config at `path`, resolved as the daemon resolves it;
    read from the file alone, so a config with problems elsewhere still names its socket.
    None when the file cannot be read as TOML (its check says why)."""
    path = path.absolute()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    problems: list[str] = []
    daemon = Table(data, "", problems).table("daemon") or Table({}, "daemon", problems)
    return parse_daemon(daemon, path.parent).control_socket


def examine(
    config_path: Path, socket: Path, status: Mapping[str, Any] | None, unreachable: str | None
) -> list[Check]:
    """Every check, in the order an operator fixes things. `status` is the daemon's answer to
    GET /v1/status, or None with `unreachable` saying why there was none."""
    up = status is not None
    config_path = config_path.absolute()
    checks = [daemon_check(socket, status, unreachable)]
    config: Config | None = None
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        checks.append(
            Check(
                "FAIL",
                "config valid",
                f"{config_path}: {len(exc.problems)} problem(s)",
                f"edit {config_path}; `vllmd check-config {config_path}` checks it again",
                tuple(exc.problems),
            )
        )
    else:
        checks.append(Check("PASS", "config valid", str(config_path)))
    gpus, devices = anyio.run(read_devices, config)
    if config is not None:
        checks.append(socket_check(config.daemon.control_socket, socket, up))
        checks.append(directory_check("state dir", config.daemon.state_dir, "daemon.state_dir"))
        checks += engine_checks(config)
    checks.append(nvml_check(gpus, config))
    checks.append(attribution_check(status, gpus))
    if config is not None:
        checks += fit_checks(config, devices)
        checks += port_checks(config, status)
    return checks


def daemon_check(socket: Path, status: Mapping[str, Any] | None, unreachable: str | None) -> Check:
    if status is None:
        return Check(
            "WARN",
            "daemon",
            unreachable or f"vllmd is unreachable at {socket}",
            "`systemctl start vllmd`; `systemctl status vllmd` and `journalctl -u vllmd` say why "
            "it stopped",
        )
    return Check("PASS", "daemon", f"vllmd {status['version']}, pid {status['pid']}, on {socket}")


def socket_check(configured: Path, socket: Path, up: bool) -> Check:
    name = "control socket"
    if up and configured.absolute() != socket.absolute():
        return Check(
            "WARN",
            name,
            f"vllmd answers on {socket} but the config says {configured}",
            "is this the daemon's config? pass the right one with --config",
        )
    if up:
        return Check("PASS", name, f"vllmd answers on {socket}")
    if len(os.fsencode(configured)) > MAX_SOCKET_PATH:
        return Check(
            "FAIL",
            name,
            f"{configured} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} bytes)",
            "choose a shorter daemon.control_socket",
        )
    return directory_check(f"{name} directory", configured.parent, "daemon.control_socket")


def directory_check(name: str, path: Path, key: str) -> Check:
    """`path` is a directory the daemon can write, or one it can create."""
    me = f"uid {os.getuid()}"
    if path.is_dir():
        if os.access(path, os.W_OK | os.X_OK):
            return Check("PASS", name, f"{path} is writable")
        return Check(
            "WARN",
            name,
            f"{path} is not writable by {me} (the daemon's user may differ)",
            f"make {path} writable by the daemon's user (`chown vllmd: {path}`)",
        )
    if path.exists() or path.is_symlink():
        return Check("FAIL", name, f"{path} is not a directory", f"remove it or change {key}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return Check(
            "FAIL",
            name,
            f"{path} cannot be created: {ancestor} is not a directory",
            f"change {key}, or move {ancestor} out of the way",
        )
    if os.access(ancestor, os.W_OK | os.X_OK):
        return Check("PASS", name, f"{path} does not exist yet; it can be created in {ancestor}")
    return Check(
        "WARN",
        name,
        f"{path} does not exist and {me} cannot create it in {ancestor}",
        "systemd's StateDirectory=/RuntimeDirectory= create it at start; else create it for the "
        "daemon's user",
    )


def engine_checks(config: Config) -> list[Check]:
    """The engine command exists; for a Python one, its module and vLLM's version."""
    command = config.engine.command
    env = {**os.environ, **config.engine.env}
    exe = shutil.which(command[0], path=env.get("PATH", os.defpath))
    if exe is None:
        return [
            Check(
                "FAIL",
                "engine command",
                f"{command[0]} not found or not executable",
                "install vLLM (`pip install vllm`) or point engine.command at it",
            )
        ]
    checks = [Check("PASS", "engine command", exe)]
    python = interpreter(exe)
    module = _module(command) if python == exe else None
    if python is not None and module is not None:
        top = module.split(".")[0]  # finding it imports nothing; a submodule would import vllm
        found = run_python(python, [FIND_MODULE, top], env)
        if found is None or found.returncode != 0:
            detail = "timed out" if found is None else "not importable"
            return [
                *checks,
                Check(
                    "FAIL",
                    "engine module",
                    f"{top} {detail} by {python}",
                    f"install it for that interpreter (`{python} -m pip install vllm`) or change "
                    "engine.command",
                ),
            ]
        checks.append(Check("PASS", "engine module", f"{top} is importable by {python}"))
    checks.append(version_check(python, env))
    return checks


def version_check(python: str | None, env: Mapping[str, str]) -> Check:
    fix = "install vLLM into the engine's Python (`pip install vllm`)"
    if python is None:
        return Check("WARN", "vLLM version", "unknown: the engine command is not a Python program")
    found = run_python(python, [VLLM_VERSION], env)
    version = found.stdout.strip() if found is not None and found.returncode == 0 else ""
    if not version:
        return Check("WARN", "vLLM version", f"unknown: no vllm package for {python}", fix)
    return Check("PASS", "vLLM version", version)


def _module(command: tuple[str, ...]) -> str | None:
    args = list(command[1:])
    return args[args.index("-m") + 1] if "-m" in args[:-1] else None


async def read_devices(
    config: Config | None,
) -> tuple[dict[str, DeviceSnapshot], dict[str, DeviceSnapshot]]:
    """NVML's GPUs, and every device by the name models use (declared ones over NVML's)."""
    silent = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    )
    nvml = NvmlProbe(timeout=5.0, log=silent)
    try:
        gpus = await nvml.snapshot()
    finally:
        nvml.close()
    declared = await DeclaredProbe(config.devices if config else {}).snapshot(gpus)
    return gpus, {**gpus, **declared}


def nvml_check(gpus: Mapping[str, DeviceSnapshot], config: Config | None) -> Check:
    name = "NVML"
    if not gpus:
        on_gpu = config is None or any(
            config.devices[d].kind == "gpu" if d in config.devices else True
            for model in config.models.values()
            for d in model.devices
        )
        detail = "not available (no NVIDIA driver or GPU): declared devices only"
        if not on_gpu:
            return Check("PASS", name, f"{detail}; no model is on a GPU")
        return Check("WARN", name, detail, "install the NVIDIA driver (`nvidia-smi` must work)")
    down = [g for g in gpus.values() if not g.up]
    summary = f"{len(gpus)} GPU(s): " + ", ".join(
        f"{g.name} {format_size(g.total)}" if g.up else f"{g.name} down" for g in gpus.values()
    )
    if down:
        return Check(
            "WARN",
            name,
            f"{summary}; {down[0].name}: {down[0].error}",
            "check `nvidia-smi`; a GPU that does not answer is left out",
        )
    return Check("PASS", name, summary)


def attribution_check(
    status: Mapping[str, Any] | None, gpus: Mapping[str, DeviceSnapshot]
) -> Check:
    """Whether NVML's per-process memory can be tied to vllmd's engines: the daemon's own
    finding (`pids_unseen` on a device), else what NVML lists from here."""
    name = "GPU attribution"
    for device in (status or {}).get("devices") or []:
        unseen = device.get("pids_unseen")
        if unseen:
            level: Status = "FAIL" if unseen["why"] == "pid_namespace" else "WARN"
            detail = f"GPU {device['name']}: {unseen['cause']}; budgeted by reservation"
            return Check(level, name, detail, unseen["fix"])
    listed = [p for g in gpus.values() if g.up for p in g.processes]
    # A driver that cannot list compute processes (NOT_SUPPORTED) is not an empty GPU.
    unlisted = [g.name for g in gpus.values() if g.up and not g.processes_listed]
    if listed and all(p.used_bytes is None for p in listed):
        return Check(
            "WARN",
            name,
            "NVML gives no per-process memory (WDDM, or no permission): budgeted by reservation",
            "run on a Linux driver that reports per-process memory",
        )
    if listed and not any(psutil.pid_exists(p.pid) for p in listed):
        return Check(
            "FAIL",
            name,
            f"none of the {len(listed)} pid(s) NVML lists exists here: another pid namespace",
            "run vllmd in the host's pid namespace (docker/podman --pid=host)",
        )
    if unlisted:
        return Check("WARN", name, f"GPU {', '.join(unlisted)}: {UNLISTED[0]}", UNLISTED[1])
    if not listed:
        return Check("PASS", name, "no compute process on a GPU to attribute")
    return Check("PASS", name, f"{len(listed)} process(es) on GPUs, their pids visible here")


def fit_checks(config: Config, devices: Mapping[str, DeviceSnapshot]) -> list[Check]:
    """Each model's reservation fits each of its devices' total minus the headroom."""
    headroom = config.scheduler.headroom
    checks = []
    for model in config.models.values():
        need = format_size(model.memory) + (" (estimated)" if model.sizing else "")
        name = f"model {model.name} fits"
        if model.memory_auto and model.memory <= 0:
            fix = (
                f"download {model.model} where the engine looks, or set models.{model.name}.memory"
            )
            checks.append(Check("WARN", name, f'memory = "auto": {model.unsized}', fix))
            continue
        known = {
            d: devices[d].total
            for d in model.devices
            if d in devices and devices[d].up and devices[d].total > 0
        }
        too_small = {d: total for d, total in known.items() if model.memory > total - headroom}
        if too_small:
            device, total = next(iter(too_small.items()))
            checks.append(
                Check(
                    "FAIL",
                    name,
                    f"{need} > device {device} {format_size(total)} - headroom "
                    f"{format_size(headroom)}",
                    f"lower models.{model.name}.memory or put it on a larger device",
                )
            )
        elif known:
            on = ", ".join(f"{d} {format_size(t)}" for d, t in known.items())
            unread = [d for d in model.devices if d not in known]
            rest = f"; {', '.join(unread)}: checked at start" if unread else ""
            checks.append(
                Check(
                    "PASS",
                    name,
                    f"{need} on {on} (headroom {format_size(headroom)}){rest}",
                )
            )
        else:
            where = ", ".join(model.devices)
            checks.append(Check("PASS", name, f"{need} on {where}: size unknown, checked at start"))
    return checks
