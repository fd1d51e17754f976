"""When a crashed engine is started again: exponential backoff, and `failed` after too many
restarts in a window (`RestartPolicy`), and what an instance keeps between an engine's end and
its next start (`Recovery`). Pure bookkeeping over a clock, like supervisord's startretries."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

from vllmd.events import Kind

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


class Recovery:
    """What an instance remembers from its engine's end to the next start: why that start is
    a restart, whether it may come at all, and how the last start failed; its `policy` counts.
    The instance asks and makes the transitions; this keeps the answers and tells (`tell`,
    the instance's) the retries and the giving up."""

    def __init__(self, policy: RestartPolicy, tell: Callable[..., None]) -> None:
        self.policy = policy
        self._tell = tell
        self.profiling_race = False  # the last start lost vLLM's memory-profiling race
        self.give_up = False  # the crash used up max_restarts: FAILED once released
        self._unlaunchable = False  # the last spawn was refused by the config itself
        self._reason: str | None = None  # set as the exit is seen: why it restarts
        self._manual: str | None = None  # restart_next()'s reason, until it starts
        self._gate: Callable[[], Awaitable[bool]] | None = None

    def restart_next(self, reason: str | None) -> None:
        self._manual = reason

    def gate(self, gate: Callable[[], Awaitable[bool]]) -> None:
        self._gate = gate

    async def may_restart(self) -> bool:
        """The gate's answer (True without one): whether a restart from BACKOFF goes ahead."""
        return self._gate is None or await self._gate()

    def start_reason(self, *, crashed: bool) -> str | None:
        """Why the start now beginning is a restart (None: it is not): the crash's reason
        after a crash of a ready engine (`crashed`: from BACKOFF), else the operator's."""
        if crashed and self._reason is not None:
            reason, self._reason = self._reason, None
            return reason
        manual, self._manual = self._manual, None
        return manual

    def spawning(self) -> None:
        self._unlaunchable = False

    def spawn_failed(self, *, unlaunchable: bool) -> None:
        """The engine could not be spawned (`unlaunchable`: the config itself refused it)."""
        self._unlaunchable = unlaunchable
        self.profiling_race = False

    def start_ended(self, output: list[str], *, failed: bool, placed: bool) -> str | None:
        """An engine's session ended (`failed`: a start that never got READY, with its last
        `output`; `placed`: a start the placer placed): vLLM's refusal line when it refused a
        placed start for free memory (uncounted: it stops for the placer), else None, and
        whether it lost the profiling race is kept."""
        refused = failed and self.policy.is_memory_refusal(output)
        if refused and placed:  # (a restart's: no load waits to plan it; retried, uncounted)
            return next(x for x in reversed(output) if MEMORY_REFUSAL in x).strip()
        self.profiling_race = failed and self.policy.is_profiling_race(output, refused)
        return None

    def started(self) -> None:
        """The engine got READY: a crash from now on is this engine's own."""
        self.profiling_race = False
        self.policy.started()

    def crashed(self, reason: str, *, ready: bool) -> dict[str, object]:
        """The engine died or must be restarted (`ready`: after it was READY): counted, with
        the fields of its BACKOFF transition."""
        policy = self.policy
        # A start that lost vLLM's memory-profiling race to a neighbour is not a crash of
        # this model: retried after a backoff, not counted (within reason).
        policy.record(profiling_race=self.profiling_race)
        if self.profiling_race:
            self._tell(Kind.START_PROFILING_RETRY, retries=policy.profiling_retries)
        # A config that cannot launch (e.g. no KV cache left) will not improve by retrying.
        self.give_up = policy.exhausted or self._unlaunchable
        self._reason = reason if ready else None
        fields: dict[str, object] = {"reason": reason}
        if not policy.exhausted:
            fields["delay"] = policy.delay()
        return fields

    def oom_killed(self) -> None:
        self._reason = "oom"

    def settled(self) -> None:
        """Stopped from BACKOFF: no restart is under way."""
        self._reason = None

    def gave_up(self) -> None:
        """FAILED (`give_up`): no restart is under way, and none comes until an operator asks."""
        self._reason = None
        self._tell(Kind.MODEL_FAILED, restarts=len(self.policy.restarts))
