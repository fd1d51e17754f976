"""What an instance keeps between an engine's end and its next start (restarts.py `Recovery`)
and how it is told of its own changes (changes.py `Changes`)."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from vllmd.events import Kind
from vllmd.instance.changes import Changes
from vllmd.instance.restarts import MEMORY_REFUSAL, PROFILING_RACE, Recovery, RestartPolicy


class Told:
    def __init__(self) -> None:
        self.events: list[tuple[Kind, dict[str, object]]] = []

    def __call__(self, kind: Kind, **fields: object) -> None:
        self.events.append((kind, fields))


def _recovery(max_restarts: int = 5) -> tuple[Recovery, Told]:
    told = Told()
    return Recovery(RestartPolicy(max_restarts, 600, clock=lambda: 1000.0), told), told


def test_a_ready_engines_crash_is_the_next_starts_restart_reason_once() -> None:
    recovery, _ = _recovery()
    fields = recovery.crashed("crash", ready=True)
    assert fields == {"reason": "crash", "delay": 1.0}
    assert recovery.start_reason(crashed=True) == "crash"
    assert recovery.start_reason(crashed=True) is None  # taken


def test_a_failed_starts_backoff_is_no_restart_but_an_operators_restart_is() -> None:
    recovery, _ = _recovery()
    recovery.crashed("start_failed", ready=False)
    recovery.restart_next("manual")
    assert recovery.start_reason(crashed=True) == "manual"
    assert recovery.start_reason(crashed=False) is None


def test_an_oom_kill_overrides_the_crash_reason_and_settling_drops_it() -> None:
    recovery, _ = _recovery()
    recovery.crashed("crash", ready=True)
    recovery.oom_killed()
    assert recovery.start_reason(crashed=True) == "oom"
    recovery.crashed("crash", ready=True)
    recovery.settled()
    assert recovery.start_reason(crashed=True) is None


def test_giving_up_past_max_restarts_is_told_with_the_count_and_has_no_delay() -> None:
    recovery, told = _recovery(max_restarts=1)
    recovery.crashed("crash", ready=True)
    assert not recovery.give_up
    assert recovery.crashed("crash", ready=True) == {"reason": "crash"}
    assert recovery.give_up
    recovery.gave_up()
    assert told.events == [(Kind.MODEL_FAILED, {"restarts": 2})]
    assert recovery.start_reason(crashed=True) is None


def test_a_config_that_cannot_launch_gives_up_at_once_until_the_next_spawn() -> None:
    recovery, _ = _recovery()
    recovery.spawning()
    recovery.spawn_failed(unlaunchable=True)
    recovery.crashed("start_failed", ready=False)
    assert recovery.give_up
    recovery.spawning()
    recovery.crashed("start_failed", ready=False)
    assert not recovery.give_up


def test_a_lost_profiling_race_is_retried_uncounted_and_told() -> None:
    recovery, told = _recovery()
    assert recovery.start_ended([f"x {PROFILING_RACE} y"], failed=True, placed=False) is None
    assert recovery.profiling_race
    recovery.crashed("start_failed", ready=False)
    assert not recovery.policy.restarts
    assert told.events == [(Kind.START_PROFILING_RETRY, {"retries": 1})]
    recovery.started()
    assert not recovery.profiling_race and recovery.policy.profiling_retries == 0


def test_a_placed_start_refused_for_memory_returns_the_refusal_line() -> None:
    recovery, _ = _recovery()
    output = ["loading", f"  ValueError: free memory {MEMORY_REFUSAL} (0.9)  ", "bye"]
    line = recovery.start_ended(output, failed=True, placed=True)
    assert line == f"ValueError: free memory {MEMORY_REFUSAL} (0.9)"
    # A restart's refusal (nobody placed it) is retried like a lost profiling race.
    assert recovery.start_ended(output, failed=True, placed=False) is None
    assert recovery.profiling_race


@pytest.mark.anyio
async def test_a_restart_waits_for_the_gate_when_there_is_one() -> None:
    recovery, _ = _recovery()
    assert await recovery.may_restart()
    answers = [False, True]

    async def gate() -> bool:
        return answers.pop(0)

    recovery.gate(gate)
    assert not await recovery.may_restart()
    assert await recovery.may_restart()


@pytest.mark.anyio
async def test_changes_wake_a_wait_when_its_condition_holds_and_call_listeners() -> None:
    changes, calls, state = Changes(), [], {"n": 0}
    changes.listen(lambda: calls.append(state["n"]))

    async def bump() -> None:
        for n in (1, 2, 3):
            state["n"] = n
            changes.notify()
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bump)
            await changes.until(lambda: state["n"] >= 2)
            assert state["n"] >= 2
    assert calls == [1, 2, 3]


@pytest.mark.parametrize("ready", [True, False])
def test_crashes_are_counted_with_a_doubling_delay(ready: bool) -> None:
    recovery, _ = _recovery()
    delays = [recovery.crashed("crash", ready=ready)["delay"] for _ in range(3)]
    assert delays == [1.0, 2.0, 4.0] and len(recovery.policy.restarts) == 3
