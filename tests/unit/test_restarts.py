from __future__ import annotations

from vllmd.instance.restarts import BACKOFF_MAX, PROFILING_RETRIES, RestartPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_from_one_second_and_is_capped() -> None:
    policy = RestartPolicy(max_restarts=100, window=1e9, clock=Clock())
    delays = []
    for _ in range(12):
        policy.record()
        delays.append(policy.delay())
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert delays[-1] == BACKOFF_MAX


def test_failed_only_past_max_restarts_within_the_window() -> None:
    clock = Clock()
    policy = RestartPolicy(max_restarts=2, window=600, clock=clock)
    policy.record()
    policy.record()
    assert not policy.exhausted
    clock.now += 601  # the first two fall out of the window
    policy.record()
    assert not policy.exhausted and len(policy.restarts) == 1
    policy.record()
    policy.record()
    assert policy.exhausted


def test_profiling_races_are_not_counted_but_are_bounded() -> None:
    policy = RestartPolicy(max_restarts=1, window=600, clock=Clock())
    race = ["AssertionError: Error in memory profiling. Initial free memory 40.1 GiB, ..."]
    for _ in range(PROFILING_RETRIES):
        assert policy.is_profiling_race(race)
        policy.record(profiling_race=True)
    assert not policy.restarts and not policy.exhausted
    assert not policy.is_profiling_race(race)  # retries exhausted: now it counts
    policy.started()
    assert policy.is_profiling_race(race)
    assert not policy.is_profiling_race(["ERROR something else"])
    refusal = [
        "ValueError: Free memory on device cuda:0 (1/80 GiB) on startup is less than desired"
    ]
    assert not policy.is_profiling_race(refusal) and policy.is_memory_refusal(refusal)
    assert not policy.is_memory_refusal(race)
