"""Disjoint core slices for cpu engines (placement/cores.py) and what the launch makes of one
(engine/argv.py: VLLM_CPU_OMP_THREADS_BIND; engine/process.py: the engine's affinity)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
from structlog.testing import capture_logs

from vllmd.config import EngineConfig, parse_config
from vllmd.engine.argv import EngineAddress, PlacedDevice, build_launch
from vllmd.engine.process import spawn
from vllmd.placement.cores import CoreSlices

CORES = (2, 3, 4, 5)


def test_engines_get_disjoint_slices_and_give_them_back() -> None:
    slices = CoreSlices()
    assert slices.assign("cpu0", "a", CORES, 2, running={"a"}) == (2, 3)
    assert slices.assign("cpu0", "b", CORES, 1, running={"a", "b"}) == (4,)
    assert slices.assign("cpu0", "c", CORES, 1, running={"a", "b", "c"}) == (5,)
    assert slices.of("cpu0", "b") == (4,)
    # a stopped: its cores are free for the next start
    assert slices.assign("cpu0", "d", CORES, 2, running={"b", "c", "d"}) == (2, 3)
    assert slices.of("cpu0", "a") == ()


def test_a_restart_takes_its_slice_anew() -> None:
    slices = CoreSlices()
    slices.assign("cpu0", "a", CORES, 1, running={"a"})
    assert slices.assign("cpu0", "a", CORES, 1, running={"a"}) == (2,)


def test_short_of_free_cores_the_least_shared_are_taken_and_said() -> None:
    slices = CoreSlices()
    slices.assign("cpu0", "a", (0, 1), 2, running={"a"})
    with capture_logs() as logs:
        assert slices.assign("cpu0", "b", (0, 1), 1, running={"a", "b"}) == (0,)
    assert [e["event"] for e in logs] == ["cores_shared"]


def test_devices_are_apart() -> None:
    slices = CoreSlices()
    assert slices.assign("cpu0", "a", CORES, 1, running={"a"}) == (2,)
    assert slices.assign("cpu1", "b", CORES, 1, running={"a", "b"}) == (2,)


def test_the_launch_binds_the_engine_to_its_slice(tmp_path: Path) -> None:
    data = {
        "devices": {"cpu0": {"kind": "cpu", "memory": "64GiB"}},
        "models": {"m": {"model": "org/m", "memory": "4GiB", "devices": ["cpu0"]}},
    }
    cfg = parse_config(data, tmp_path)
    placed = (PlacedDevice("cpu0", "cpu", 64 << 30, cores=(2, 3, 5)),)
    env = build_launch(
        cfg.models["m"], EngineConfig(), EngineAddress(uds=tmp_path / "s"), placed, {}
    ).env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3,5"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    unbound = (PlacedDevice("cpu0", "cpu", 64 << 30),)
    plain = build_launch(
        cfg.models["m"], EngineConfig(), EngineAddress(uds=tmp_path / "s"), unbound, {}
    )
    assert "VLLM_CPU_OMP_THREADS_BIND" not in plain.env


def test_the_engine_process_runs_on_its_slice_only() -> None:
    """The affinity is set on the engine's process before it starts any thread: what it
    forks inherits it."""
    core = min(os.sched_getaffinity(0))
    show = "import os; print(sorted(os.sched_getaffinity(0)), flush=True)"
    script = f"{show}; import subprocess, sys; subprocess.run([sys.executable, '-c', {show!r}])"

    async def run() -> list[bytes]:
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core)}
        engine = await spawn([sys.executable, "-c", script], env)
        out = engine.process.stdout
        assert out is not None
        lines = b""
        async for chunk in out:
            lines += chunk
        await engine.process.wait()
        return lines.splitlines()

    assert anyio.run(run) == [f"[{core}]".encode()] * 2


def test_a_bad_slice_is_logged_not_fatal() -> None:
    async def run() -> int:
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "4096"}
        engine = await spawn([sys.executable, "-c", "pass"], env)
        return await engine.process.wait()

    with capture_logs() as logs:
        assert anyio.run(run) == 0
    assert "affinity_not_set" in [e["event"] for e in logs]
