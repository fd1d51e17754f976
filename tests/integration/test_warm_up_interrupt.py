"""The warm-up after /health turns 200 (and after a wake) is raced against the instance no
longer being wanted and the engine's exit: an unload during a wedged warm-up stops the engine
at once, with no failed start and no restart; a warm-up nobody interrupts still times out."""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from pathlib import Path

import anyio
import pytest

from tests.fakes.fake_gpu import FakeGpu
from tests.integration.harness import client, eventually, fake_config, running
from vllmd.daemon import Running
from vllmd.errors import VllmdError
from vllmd.events import Event, Kind
from vllmd.instance.instance import Instance
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
S = InstanceState
ROOT = Path(__file__).resolve().parents[2]
# The fake engine, wedged from its first wake on: the start's warm-up answers, the wake's never.
WEDGED_AFTER_WAKE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from tests.fakes import fake_engine

wake_up = fake_engine.FakeEngine.wake_up


async def wedging_wake_up(self, request):
    response = await wake_up(self, request)
    self.mode = "infer_wedged"
    return response


fake_engine.FakeEngine.wake_up = wedging_wake_up
fake_engine.main()
"""


def _warm_ups(events: Path) -> int:
    """How many inferences reached the engine (the warm-ups here: no client asks one)."""
    if not events.exists():
        return 0
    return sum(1 for x in events.read_text().splitlines() if x.startswith("request /v1/"))


def _kinds(history: list[Event], model: str) -> list[str]:
    return [e.kind.value for e in history if e.model == model]


def _states(history: list[Event], model: str) -> list[str]:
    return [str(e.fields["new"]) for e in history if e.model == model and e.kind == Kind.STATE]


def _state(instance: Instance) -> InstanceState:
    return instance.state  # (read anew: mypy narrows an attribute across awaits)


async def _ask(operation: Awaitable[None], errors: list[VllmdError]) -> None:
    try:
        await operation
    except VllmdError as exc:  # the unload cancels a load (or wake) that waits for READY
        errors.append(exc)


async def _unload_within(run: Running, instance: Instance, seconds: float) -> float:
    began = anyio.current_time()
    with anyio.fail_after(seconds):
        await run.supervisor.unload(instance)
    return anyio.current_time() - began


async def test_unload_during_a_wedged_warm_up_stops_the_engine_at_once(tmp_path: Path) -> None:
    """/health answers 200 but the warm-up never does: an unload stops the engine within
    seconds (not at the end of startup_timeout), with no start_failed, no restart and no
    backoff."""
    events = tmp_path / "events"
    env = {"FAKE_MODE": "infer_wedged", "FAKE_STARTUP_DELAY": "0", "FAKE_EVENTS_FILE": str(events)}
    config = fake_config(tmp_path, {"m": {"env": env}}, engine={"startup_timeout": "30s"})
    errors: list[VllmdError] = []
    async with running(config) as run:
        m = run.supervisor.get("m")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_ask, run.supervisor.load(m), errors)
            await eventually(lambda: _warm_ups(events) == 1, timeout=10)
            assert _state(m) is S.STARTING  # the premise: the warm-up is under way
            took = await _unload_within(run, m, 8)
        state, restarts, pgid = _state(m), len(m.restarts), m.pgid()
        history = list(run.events.history)
    assert took < 5, took
    assert state is S.STOPPED and pgid is None
    assert restarts == 0 and m.start_failures == 0
    assert Kind.START_FAILED.value not in _kinds(history, "m")
    assert _states(history, "m") == ["starting", "stopping", "stopped"]
    assert len(errors) == 1 and "unloaded" in str(errors[0])


async def test_a_wedged_warm_up_nobody_interrupts_is_a_timed_out_start(tmp_path: Path) -> None:
    """Nobody unloads: the warm-up ends at startup_timeout as a failed start whose result is
    `timeout`, counted like any other; the waiting request is told."""
    env = {"FAKE_MODE": "infer_wedged", "FAKE_STARTUP_DELAY": "0"}
    config = fake_config(tmp_path, {"m": {"env": env}}, engine={"startup_timeout": "3s"})
    async with running(config) as run, client(run) as http:
        began = anyio.current_time()
        with anyio.fail_after(15):
            r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        took = anyio.current_time() - began
        m = run.supervisor.get("m")
        history = list(run.events.history)
        pgid = m.pgid()
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "start_failed"
    assert "failed its warm-up" in r.json()["error"]["message"]
    assert 2.5 < took < 10, took
    assert pgid is None
    failed = [e for e in history if e.kind == Kind.START_FAILED]
    assert len(failed) == 1
    assert failed[0].fields["result"] == "timeout"
    assert "did not answer within 3s" in str(failed[0].fields["error"])
    assert "ready" not in _states(history, "m")


async def test_unload_during_a_wedged_wake_warm_up_stops_the_engine_at_once(
    tmp_path: Path,
) -> None:
    """Asleep on a (fake) GPU, woken, and its warm-up never answers: an unload stops it
    within seconds, with no wake_failed, no crash and no restart."""
    gpu = FakeGpu(tmp_path / "gpu")
    events = tmp_path / "events"
    script = tmp_path / "wedged_after_wake.py"
    script.write_text(WEDGED_AFTER_WAKE)
    config = fake_config(
        tmp_path,
        {"m": {"devices": ["0"], "memory": "8GiB", "env": {"FAKE_EVENTS_FILE": str(events)}}},
        devices={},
        engine={"command": [sys.executable, str(script)], "startup_timeout": "30s"},
        scheduler={"min_residency": "0s"},
    )
    async with running(config, gpu.env(), probe=gpu) as run:
        m = run.supervisor.get("m")
        with anyio.fail_after(20):
            await run.supervisor.load(m)
            await run.supervisor.sleep(m)
        assert _state(m) is S.SLEEPING and _warm_ups(events) == 1
        errors: list[VllmdError] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_ask, run.supervisor.wake(m), errors)
            await eventually(lambda: _warm_ups(events) == 2, timeout=10)
            assert _state(m) is S.WAKING  # the premise: the wake's warm-up is under way
            took = await _unload_within(run, m, 8)
        state, restarts, pgid = _state(m), len(m.restarts), m.pgid()
        history = list(run.events.history)
    assert took < 5, took
    assert state is S.STOPPED and pgid is None and restarts == 0
    kinds = _kinds(history, "m")
    assert Kind.WAKE_FAILED.value not in kinds and Kind.CRASHED.value not in kinds
    assert Kind.START_FAILED.value not in kinds
    assert _states(history, "m")[-4:] == ["sleeping", "waking", "stopping", "stopped"]
    assert len(errors) == 1 and "unloaded" in str(errors[0])
