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
from vllmd.instance.changes import Changes
from vllmd.instance.launch import spawn, version_key
from vllmd.instance.outcomes import START_FAILURES, End
from vllmd.instance.restarts import Recovery, RestartPolicy
from vllmd.instance.session import Session
from vllmd.instance.states import InstanceState, Want, check_transition
from vllmd.instance.status import ModelStatus, model_status

S = InstanceState


class Instance:
    def __init__(self, model: ModelConfig, ctx: Context) -> None:
        self.model = model
        self.engine = ctx.config.engine  # its engine's: a change restarts it (`replace`)
        self.name = model.name
        self._ctx = ctx  # what every start is made with (launch.py)
        self._events = ctx.events
        self._base_env = ctx.base_env
        self._versions = ctx.versions
        self.clock = ctx.clock
        self.log = structlog.get_logger("vllmd.instance").bind(model=model.name)

        self.state = S.STOPPED
        self.state_since = self.clock()
        self.state_wall = time.time()  # state_since as a unix time, for readers
        self.transitions = 0
        self.output = EngineOutput(self.log)
        self._session: Session | None = None
        self._placement: tuple[PlacedDevice, ...] = ()
        self.last_pids: frozenset[int] = frozenset()  # the previous engine's processes
        self.engine_names: frozenset[str] = frozenset()  # the running engine's served names
        self.in_flight = 0
        self.last_used = 0.0  # clock time; 0 = never
        self.last_used_wall: float | None = None  # last_used as a unix time, for readers
        self.ready_since: float | None = None
        self.active_since: float | None = None  # ready or woken at (min_residency)
        self.last_error: str | None = None
        self.load_seconds: float | None = None  # how long the last start took
        policy = RestartPolicy(model.max_restarts, model.restart_window, self.clock)
        self._recovery = Recovery(policy, self.tell)  # why and whether it restarts (restarts.py)
        self.start_failures = 0  # waiters compare it before and after to see a start fail
        self.starts = 0
        self._want: Want = "down"
        self._sleep_to = 1
        # The last start was refused by vLLM for free memory; the one under way is the placer's.
        self.memory_refused = self._placed = False
        self._replacement: tuple[ModelConfig, EngineConfig] | None = None  # until STOPPED
        self._changes = Changes()

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
            self._changes.notify()

    def want_down(self) -> None:
        """Stop the engine; a `failed` one (no process) is `stopped` at once, window reset."""
        if self.state is S.FAILED:
            self._want = "down"
            self.restart_policy.reset()
            self.transition(S.STOPPED)  # FAILED -> STOPPED
            return
        if self._want != "down":
            self._want = "down"
            self._changes.notify()

    def want_asleep(self, level: int) -> None:
        """Put a running engine to sleep (drained first; only with sleep mode). A stop wins."""
        if self._want == "up":
            self._want, self._sleep_to = "asleep", level
            self._changes.notify()

    def reconfigure(self, model: ModelConfig, engine: EngineConfig) -> None:
        """A reload changed only live keys: the running engine, if any, is kept."""
        self.model, self.engine = model, engine
        self.restart_policy.configure(model.max_restarts, model.restart_window)

    async def replace(self, model: ModelConfig, engine: EngineConfig) -> None:
        """A reload changed what the engine starts with: stop it (if any), return once the new
        config is in place. The instance stays, so its waiting requests go to the next start;
        a start asked but not begun stops before it spawns (`_run_engine`)."""
        self._replacement = (model, engine)
        self.want_down()  # (FAILED -> STOPPED at once, which adopts it)

        def over() -> bool:  # adopted on the way to STOPPED (`transition`), or nothing runs
            return self._replacement is None or (self.state is S.STOPPED and not self._keep)

        await self.until(over)
        if self._replacement is not None:  # stopped already (or an unload beat the start)
            self._adopt()

    def _adopt(self) -> None:
        """No engine of the old config is left: as a new instance, with a fresh window."""
        assert self._replacement is not None
        (model, engine), self._replacement, self.last_error = self._replacement, None, None
        self.reconfigure(model, engine)
        self.restart_policy.reset()

    def restart_next(self, reason: str | None) -> None:
        """The next start is a restart for `reason` (an operator's: "manual"), counted so;
        None: it is not (the restart was given up)."""
        self._recovery.restart_next(reason)

    def on_change(self, listener: Callable[[], None]) -> None:
        """`listener` is called on every change (a transition, a request ending, a wish)."""
        self._changes.listen(listener)

    def gate_restarts(self, gate: Callable[[], Awaitable[bool]]) -> None:
        """Have every restart from BACKOFF wait for `gate()` (the placer's start slot); a
        False answer means: do not restart (unwanted, or vllmd is shutting down)."""
        self._recovery.gate(gate)

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

    @property
    def pid(self) -> int | None:
        return self._session.pid if self._session is not None else None

    def pgid(self) -> int | None:
        return self._session.process.record.pgid if self._session is not None else None

    @property
    def restart_policy(self) -> RestartPolicy:
        return self._recovery.policy

    @property
    def restarts(self) -> Sequence[float]:
        """Times of the restarts counted in the current window."""
        return self.restart_policy.restarts

    def status(
        self, *, queue_depth: int = 0, held: int = 0, measured: int = 0, pinned: bool = False
    ) -> ModelStatus:
        """The frozen view readers get; what others account for it is passed in."""
        return model_status(self, queue_depth, held, measured, pinned)

    async def wait_state(self, *states: InstanceState) -> None:
        await self._changes.until(lambda: self.state in states)

    def begin_request(self) -> None:
        self.in_flight += 1
        self.last_used = self.clock()

    def end_request(self) -> None:
        self.in_flight -= 1
        self.last_used = self.clock()
        self.last_used_wall = time.time()
        if self.in_flight == 0:
            self._changes.notify()

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
            restart = self.state is S.BACKOFF and self._want == "up"
            if restart and not await self._recovery.may_restart():
                await self.until(lambda: self._want != "up")
            if self._want != "up":
                if self.state is S.BACKOFF:
                    self.transition(S.STOPPED)  # BACKOFF -> STOPPED
                await self.until(lambda: self._want == "up")
                continue
            if self.state in (S.STOPPED, S.FAILED, S.BACKOFF):
                reason = self._recovery.start_reason(crashed=self.state is S.BACKOFF)
                fields = {"restart_reason": reason} if reason else {}
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
        fields = self._recovery.crashed(reason, ready=self.ready_since is not None)
        self.transition(S.BACKOFF, **fields)  # STARTING/READY/... -> BACKOFF

    async def _backoff(self, end: End) -> None:
        """Once the engine's processes are gone: FAILED past max_restarts in restart_window,
        else wait out the backoff delay (the loop then starts it again)."""
        if self.state is not S.BACKOFF:  # a failed start: counted only now
            self._enter_backoff(end.value)
        if not self._keep or self._replacement is not None:
            # Unloaded meanwhile, or its config replaced by a reload (an old config's failure
            # says nothing of the new one): stopped, not failed nor restarted.
            self._want = "down"
            self._recovery.settled()
            self.transition(S.STOPPED)  # BACKOFF -> STOPPED (which adopts a replacement)
            return
        if self._recovery.give_up:
            self._want = "down"
            self.transition(S.FAILED, reason=end.value, error=self.last_error)  # -> FAILED
            self._recovery.gave_up()  # told once FAILED
            return
        remaining = self.state_since + self.restart_policy.delay() - self.clock()
        with anyio.move_on_after(max(0.0, remaining)):
            await self.until(lambda: not self._keep)

    async def _run_engine(self) -> End:
        """One engine process from spawn to its end. Entered in STARTING; returns with no
        process left and the state at BACKOFF-to-be (crash) or STOPPED."""
        self._recovery.spawning()
        self.output.mark_start()

        def wanted() -> bool:  # still, once the launch is prepared: else nothing is spawned
            return self._keep and self._replacement is None

        try:
            session = await spawn(
                self.model, self.engine, self._placement, self._ctx, self.log, wanted
            )
        except (ConfigError, OSError) as exc:
            self._recovery.spawn_failed(unlaunchable=isinstance(exc, ConfigError))
            self.last_error = f"engine for {self.name} could not be spawned: {exc}"
            self._start_failed("failed")
            return End.START_FAILED
        if session is None:  # unwanted, or placed for a replaced config, meanwhile
            self._want = "down"
            self.transition(S.STOPPING)  # STARTING -> STOPPING
            self.transition(S.STOPPED)  # STOPPING -> STOPPED
            return End.STOPPED
        self._session = session
        self.engine_names = frozenset(self.model.served_names)
        self.starts += 1
        fields = session.process.record.fields()
        self._events.emit(Kind.SPAWNED, self.name, **fields, address=session.address.describe())
        try:
            async with session.supervised(self.output, self._changes.notify):
                end = await session.run(self, self.engine, self.model.served_names[0])
        finally:
            self.last_pids = session.pids_at_end
            self._session = None
            self.ready_since = self.active_since = None
        failed, placed, self._placed = end in START_FAILURES, self._placed, False
        output = self.output.since_start(last=OUTPUT_LINES) if failed else []
        self._versions.start_failed(version_key(self.model, self.engine, self._base_env), output)
        refusal = self._recovery.start_ended(output, failed=failed, placed=placed)
        if refusal is not None:
            return self._refused(refusal)
        if end is End.STOPPED:
            self.transition(S.STOPPED)  # STOPPING -> STOPPED
        elif end in START_FAILURES and not self._recovery.profiling_race:
            # Told once nothing of the engine is left.
            self._start_failed("timeout" if end is End.START_TIMEOUT else "failed")
        return end

    def _refused(self, line: str) -> End:
        """vLLM found too little free memory to start (`line`): uncounted, it stops for the
        placer."""
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
        await self._changes.until(condition)

    def transition(self, new: InstanceState, **fields: object) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        self.transitions += 1
        self.state_since = self.clock()
        self.state_wall = time.time()
        if new is S.STOPPED and self._replacement is not None:
            self._adopt()  # before anyone hears of it: the next start is placed anew
        self._events.emit(Kind.STATE, self.name, old=str(old), new=str(new), **fields)
        self._changes.notify()

    def ready(self, version: str | None) -> None:  # STARTING -> READY
        self._versions.served(version_key(self.model, self.engine, self._base_env), version)
        self.ready_since = self.active_since = self.clock()
        self.load_seconds = self.ready_since - self.state_since
        self._recovery.started()  # a crash from now on is this engine's own
        self.transition(S.READY, load_seconds=round(self.load_seconds, 3), engine_version=version)

    def woke(self, seconds: float) -> None:
        self.active_since = self.clock()
        self.transition(S.READY, wake_seconds=round(seconds, 3))  # WAKING -> READY

    def failed(self, error: str, reason: str | None = None) -> None:
        self.last_error = error
        if reason is not None:
            self._enter_backoff(reason)

    def oom_killed(self) -> None:
        self._recovery.oom_killed()

    def tell(self, kind: Kind, **fields: object) -> None:
        self._events.emit(kind, self.name, **fields)

    # --- helpers -------------------------------------------------------------------------------

    def _start_failed(self, result: Literal["failed", "timeout"]) -> None:
        self.start_failures += 1
        self._events.emit(Kind.START_FAILED, self.name, error=self.last_error, result=result)
        self._changes.notify()
