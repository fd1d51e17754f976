"""When a crashed engine is started again: exponential backoff, and `failed` after too many
restarts in a window. Pure bookkeeping over a clock, like supervisord's startretries."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
# vLLM's refusal to start when CUDA's free memory, after its context, is below its fraction
# (vllm/v1/worker/utils.py `request_memory`): memory others hold, a lasting shortage the
# placer re-plans for, never this model's failure.
MEMORY_REFUSAL = "on startup is less than desired"
# The race: memory another process released while vLLM profiled (vllm/v1/worker/gpu_worker.py
# `determine_available_memory`'s assertion): retried, counted apart.
PROFILING_RACE = "Error in memory profiling"
PROFILING_RETRIES = 10  # uncounted retries of such starts before they count as failures


class RestartPolicy:
    def __init__(
        self, max_restarts: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self._clock = clock
        self.restarts: deque[float] = deque()  # times of counted restarts within the window
        self.profiling_retries = 0  # uncounted retries since the last successful start

    def configure(self, max_restarts: int, window: float) -> None:
        """New limits (a reload); the restarts counted so far stay counted."""
        self.max_restarts = max_restarts
        self.window = window

    @staticmethod
    def is_memory_refusal(output: list[str]) -> bool:
        """The start was refused by vLLM for want of free memory on a device."""
        return any(MEMORY_REFUSAL in line for line in output)

    def is_profiling_race(self, output: list[str], refused: bool = False) -> bool:
        """The start failed because memory changed under vLLM's profiling, or was `refused`
        for memory on a restart no load waits for (and such retries are not yet exhausted)."""
        if self.profiling_retries >= PROFILING_RETRIES:
            return False
        return refused or any(PROFILING_RACE in line for line in output)

    def record(self, *, profiling_race: bool = False) -> None:
        now = self._clock()
        if profiling_race:
            self.profiling_retries += 1
        else:
            self.restarts.append(now)
        while self.restarts and self.restarts[0] < now - self.window:
            self.restarts.popleft()

    @property
    def exhausted(self) -> bool:
        """More restarts in the window than allowed: the model is `failed`."""
        return len(self.restarts) > self.max_restarts

    def delay(self) -> float:
        """1 s, doubling with each counted restart in the window, at most 5 min."""
        return min(BACKOFF_FIRST * 2.0 ** max(0, len(self.restarts) - 1), BACKOFF_MAX)

    def reset(self) -> None:
        """A fresh window: an operator cleared `failed` (load, restart, unload, reload)."""
        self.restarts.clear()
        self.profiling_retries = 0

    def started(self) -> None:
        self.profiling_retries = 0
