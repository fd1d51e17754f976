"""One model: its desired state, its state machine, backoff and restarts.

An `Instance` is an actor: `run()` lives in the daemon's task group for the daemon's whole life
and carries out what is asked of it (`want_up`, `want_down`, `want_asleep`) one transition at a
time. Each engine process it runs is a `Session` (session.py), which does the single steps;
the instance decides which step comes next. Every wait is on an event (process exit, health
answer, a new wish); the one poll is the health check of a starting engine.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import anyio
import structlog
from anyio.abc import TaskStatus

from vllmd.config import EngineConfig, ModelConfig
from vllmd.context import Context
from vllmd.engine.api import EngineAPI, Upstream
from vllmd.engine.argv import PlacedDevice
from vllmd.engine.output import OUTPUT_LINES, EngineOutput
from vllmd.errors import ConfigError
from vllmd.events import Kind
from vllmd.instance.launch import prepare, version_key
from vllmd.instance.outcomes import START_FAILURES, End
from vllmd.instance.restarts import MEMORY_REFUSAL, RestartPolicy
from vllmd.instance.session import Session, discard_address
from vllmd.instance.states import InstanceState, Want, check_transition
from vllmd.instance.status import ModelStatus

S = InstanceState


class Instance:
    def __init__(self, model: ModelConfig, ctx: Context) -> None:
        self.model = model
        self.engine = ctx.config.engine  # as when the instance was made: a change replaces it
        self.name = model.name
        self._options = ctx.options
        self._events = ctx.events
        self._spawn = ctx.spawner
        self._base_env = ctx.base_env
        self._versions = ctx.versions
        self.clock = ctx.clock
        self.log = structlog.get_logger("vllmd.instance").bind(model=model.name)

        self.state = S.STOPPED
        self.state_since = self.clock()
        self._state_wall = time.time()  # state_since as a unix time, for readers
        self.transitions = 0
        self.output = EngineOutput(self.log)
        self._session: Session | None = None
        self._placement: tuple[PlacedDevice, ...] = ()
        self.last_pids: frozenset[int] = frozenset()  # the previous engine's processes
        self.engine_names: frozenset[str] = frozenset()  # the running engine's served names
        self.in_flight = 0
        self.last_used = 0.0  # clock time; 0 = never
        self._last_used_wall: float | None = None
        self.ready_since: float | None = None
        self.active_since: float | None = None  # ready or woken at (min_residency)
        self.last_error: str | None = None
        self.load_seconds: float | None = None  # how long the last start took
        self.restart_policy = RestartPolicy(model.max_restarts, model.restart_window, self.clock)
        self.start_failures = 0  # waiters compare it before and after to see a start fail
        self.starts = 0
        self._listeners: list[Callable[[], None]] = []
        self._start_gate: Callable[[], Awaitable[bool]] | None = None
        self._want: Want = "down"
        self._sleep_to = 1
        self._profiling_race = False
        # The last start was refused by vLLM for free memory; the one under way is the placer's.
        self.memory_refused = self._placed = False
        self._restart_reason: str | None = None  # set as the exit is seen: why it restarts
        self._fail_when_released = False  # the crash used up max_restarts
        self._unlaunchable = False  # the last spawn was refused by the config itself
        self._manual_restart: str | None = None  # restart_next()'s reason, until it starts
        self._changed = anyio.Event()

    # --- what others ask -------------------------------------------------------------------

    def want_up(self, placement: tuple[PlacedDevice, ...] | None = None) -> None:
        """Start the engine (on `placement`, the placer's answer), wake it, or keep it running.
        Clears `failed`: a deliberate ask, which starts a fresh restart window."""
        if placement is not None:
            self._placement, self._placed = placement, True
        self.memory_refused = False
        if self.state is S.FAILED:
            self.restart_policy.reset()
        if self._want != "up":
            self._want = "up"
            self._notify()

    def want_down(self) -> None:
        """Stop the engine; a `failed` one (no process) is `stopped` at once, window reset."""
        if self.state is S.FAILED:
            self._want = "down"
            self.restart_policy.reset()
            self.transition(S.STOPPED)  # FAILED -> STOPPED
            return
        if self._want != "down":
            self._want = "down"
            self._notify()

    def want_asleep(self, level: int) -> None:
        """Put a running engine to sleep (drained first; only with sleep mode). A stop wins."""
        if self._want == "up":
            self._want, self._sleep_to = "asleep", level
            self._notify()

    def reconfigure(self, model: ModelConfig, engine: EngineConfig) -> None:
        """A reload changed only live keys: the running engine, if any, is kept."""
        self.model, self.engine = model, engine
        self.restart_policy.configure(model.max_restarts, model.restart_window)

    def restart_next(self, reason: str | None) -> None:
        """The next start is a restart for `reason` (an operator's: "manual"), counted so;
        None: it is not (the restart was given up)."""
        self._manual_restart = reason

    def on_change(self, listener: Callable[[], None]) -> None:
        """`listener` is called on every change (a transition, a request ending, a wish)."""
        self._listeners.append(listener)

    def gate_restarts(self, gate: Callable[[], Awaitable[bool]]) -> None:
        """Have every restart from BACKOFF wait for `gate()` (the placer's start slot); a
        False answer means: do not restart (unwanted, or vllmd is shutting down)."""
        self._start_gate = gate

    @property
    def wanted_up(self) -> bool:
        return self._want == "up"

    @property
    def _keep(self) -> bool:
        """Whether an engine process should exist (running or asleep)."""
        return self._want != "down"

    @property
    def upstream(self) -> Upstream | None:
        """The gateway's path to the running engine."""
        return self._session.upstream if self._session is not None else None

    @property
    def api(self) -> EngineAPI | None:
        """The running engine's own routes (health, metrics, ...); None: no engine."""
        return self._session.api if self._session is not None else None

    @property
    def sleep_level(self) -> int:
        """The level the engine sleeps at, while asleep (0 otherwise)."""
        return self._session.sleep_level if self._session is not None else 0

    def pids(self) -> frozenset[int]:
        """The running engine's known processes (none when there is no engine)."""
        return self._session.pids() if self._session is not None else frozenset()

    def pgid(self) -> int | None:
        return self._session.process.record.pgid if self._session is not None else None

    @property
    def restarts(self) -> Sequence[float]:
        """Times of the restarts counted in the current window."""
        return self.restart_policy.restarts

    def status(
        self, *, queue_depth: int = 0, held: int = 0, measured: int = 0, pinned: bool = False
    ) -> ModelStatus:
        """The frozen view readers get; what others account for it is passed in."""
        session = self._session
        return ModelStatus(
            name=self.name,
            model=self.model,
            state=self.state,
            state_since=self._state_wall,
            in_flight=self.in_flight,
            queue_depth=queue_depth,
            held_bytes=held,
            measured_bytes=measured,
            last_used=self._last_used_wall,
            pid=session.pid if session is not None else None,
            restarts=len(self.restart_policy.restarts),
            error=self.last_error,
            load_seconds=self.load_seconds,
            sleep_level=self.sleep_level,
            pinned=pinned,
        )

    async def wait_state(self, *states: InstanceState) -> None:
        while self.state not in states:
            await self._changed.wait()

    def begin_request(self) -> None:
        self.in_flight += 1
        self.last_used = self.clock()

    def end_request(self) -> None:
        self.in_flight -= 1
        self.last_used = self.clock()
        self._last_used_wall = time.time()
        if self.in_flight == 0:
            self._notify()

    # --- the actor ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise this model for the daemon's life: start when wanted, restart crashes with
        backoff, stop when no longer wanted."""
        task_status.started()
        while True:
            await self.until(lambda: self._want == "up" or self.state is S.BACKOFF)
            # A restart is a start like any other: one memory operation per device. The
            # gate says no when the model is no longer wanted or vllmd is shutting down:
            # then wait for the stop that follows.
            gate = self._start_gate
            if self.state is S.BACKOFF and self._want == "up" and gate and not await gate():
                await self.until(lambda: self._want != "up")
            if self._want != "up":
                if self.state is S.BACKOFF:
                    self.transition(S.STOPPED)  # BACKOFF -> STOPPED
                await self.until(lambda: self._want == "up")
                continue
            if self.state is S.BACKOFF and self._restart_reason is not None:
                reason, self._restart_reason = self._restart_reason, None
                self.transition(S.STARTING, restart_reason=reason)  # BACKOFF -> STARTING
            elif self.state in (S.STOPPED, S.FAILED, S.BACKOFF):
                manual, self._manual_restart = self._manual_restart, None
                fields = {"restart_reason": manual} if manual else {}
                self.transition(S.STARTING, **fields)  # STOPPED/FAILED/BACKOFF -> STARTING
            end = await self._run_engine()
            if end is not End.STOPPED:
                await self._backoff(end)

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
            self._events.emit(Kind.START_PROFILING_RETRY, self.name, retries=retries)
        # A config that cannot launch (e.g. no KV cache left) will not improve by retrying.
        self._fail_when_released = policy.exhausted or self._unlaunchable
        self._restart_reason = reason if self.ready_since is not None else None
        fields: dict[str, object] = {"reason": reason}
        if not policy.exhausted:
            fields["delay"] = policy.delay()
        self.transition(S.BACKOFF, **fields)  # STARTING/READY/... -> BACKOFF

    async def _backoff(self, end: End) -> None:
        """Once the engine's processes are gone: FAILED past max_restarts in restart_window,
        else wait out the backoff delay (the loop then starts it again)."""
        if self.state is not S.BACKOFF:  # a failed start: counted only now
            self._enter_backoff(end.value)
        policy = self.restart_policy
        if not self._keep:  # unloaded meanwhile: stopped, not failed nor restarted
            self._restart_reason = None
            self.transition(S.STOPPED)  # BACKOFF -> STOPPED
            return
        if self._fail_when_released:
            self._want = "down"
            self._restart_reason = None
            self.transition(S.FAILED, reason=end.value, error=self.last_error)  # -> FAILED
            self._events.emit(Kind.MODEL_FAILED, self.name, restarts=len(policy.restarts))
            return
        remaining = self.state_since + policy.delay() - self.clock()
        with anyio.move_on_after(max(0.0, remaining)):
            await self.until(lambda: not self._keep)

    async def _run_engine(self) -> End:
        """One engine process from spawn to its end. Entered in STARTING; returns with no
        process left and the state at BACKOFF-to-be (crash) or STOPPED."""
        self._unlaunchable = False
        self.output.mark_start()
        try:
            launch, address = await prepare(
                self.model,
                self.engine,
                self._placement,
                self._base_env,
                self._options.runtime_dir,
                self.log,
                self._versions,
            )
            if not self._keep:  # unwanted while the launch was prepared: spawn nothing
                discard_address(address)
                self.transition(S.STOPPING)  # STARTING -> STOPPING
                self.transition(S.STOPPED)  # STOPPING -> STOPPED
                return End.STOPPED
            session = await Session.spawn(self._spawn, launch, address, self._options, self.log)
        except (ConfigError, OSError) as exc:
            self._unlaunchable = isinstance(exc, ConfigError)
            self.last_error = f"engine for {self.name} could not be spawned: {exc}"
            self._profiling_race = False
            self._start_failed("failed")
            return End.START_FAILED
        self._session = session
        self.engine_names = frozenset(self.model.served_names)
        self.starts += 1
        fields = session.process.record.fields()
        self._events.emit(Kind.SPAWNED, self.name, **fields, address=address.describe())
        try:
            async with session.supervised(self.output, self._notify):
                end = await session.run(self, self.engine, self.model.served_names[0])
        finally:
            self.last_pids = session.pids_at_end
            self._session = None
            self.ready_since = self.active_since = None
        failed, placed, self._placed = end in START_FAILURES, self._placed, False
        output = self.output.since_start(last=OUTPUT_LINES) if failed else []
        self._versions.start_failed(version_key(self.model, self.engine, self._base_env), output)
        refused = failed and self.restart_policy.is_memory_refusal(output)
        if refused and placed:  # (a restart's: no load waits to plan it; retried, uncounted)
            return self._refused(output)
        self._profiling_race = failed and self.restart_policy.is_profiling_race(output, refused)
        if end is End.STOPPED:
            self.transition(S.STOPPED)  # STOPPING -> STOPPED
        elif end in START_FAILURES and not self._profiling_race:
            # Told once nothing of the engine is left.
            self._start_failed("timeout" if end is End.START_TIMEOUT else "failed")
        return end

    def _refused(self, output: list[str]) -> End:
        """vLLM found too little free memory to start: uncounted, it stops for the placer."""
        line = next(x for x in reversed(output) if MEMORY_REFUSAL in x).strip()
        self.memory_refused, self._want = True, "down"
        self.last_error = f"vLLM refused to start {self.name}: {line}"
        self._events.emit(Kind.START_REFUSED, self.name, error=line)
        self.transition(S.STOPPING)  # STARTING -> STOPPING (the engine is gone already)
        self.transition(S.STOPPED)  # STOPPING -> STOPPED
        return End.STOPPED

    # --- told by its session (session.Owner) ---------------------------------------------------

    @property
    def want(self) -> Want:
        return self._want

    @property
    def sleep_to(self) -> int:
        return self._sleep_to

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds, looked at again on every change."""
        while not condition():
            await self._changed.wait()

    def transition(self, new: InstanceState, **fields: object) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        self.transitions += 1
        self.state_since = self.clock()
        self._state_wall = time.time()
        self._events.emit(Kind.STATE, self.name, old=str(old), new=str(new), **fields)
        self._notify()

    def ready(self, version: str | None) -> None:  # STARTING -> READY
        self._versions.served(version_key(self.model, self.engine, self._base_env), version)
        self._profiling_race = False  # a crash from now on is this engine's own
        self.ready_since = self.active_since = self.clock()
        self.load_seconds = self.ready_since - self.state_since
        self.restart_policy.started()
        self.transition(S.READY, load_seconds=round(self.load_seconds, 3), engine_version=version)

    def woke(self, seconds: float) -> None:
        self.active_since = self.clock()
        self.transition(S.READY, wake_seconds=round(seconds, 3))  # WAKING -> READY

    def failed(self, error: str, reason: str | None = None) -> None:
        self.last_error = error
        if reason is not None:
            self._enter_backoff(reason)

    def oom_killed(self) -> None:
        self._restart_reason = "oom"

    def tell(self, kind: Kind, **fields: object) -> None:
        self._events.emit(kind, self.name, **fields)

    # --- helpers -------------------------------------------------------------------------------

    def _start_failed(self, result: Literal["failed", "timeout"]) -> None:
        self.start_failures += 1
        self._events.emit(Kind.START_FAILED, self.name, error=self.last_error, result=result)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        for listener in self._listeners:
            listener()
