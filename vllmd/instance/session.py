"""One engine process's life: spawn -> ready -> serve -> sleep/wake -> stop.

A `Session` owns what exists only while one engine process does: the process, its address,
the HTTP client of vllmd's own calls and the gateway's `Upstream`. It carries out single
steps and reports typed results; deciding which step comes next (the model's desired state,
backoff, restarts) is the instance's (`instance.py`).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import anyio
import structlog

from vllmd.config import EngineConfig
from vllmd.engine.api import EngineAPI, make_client
from vllmd.engine.argv import EngineAddress, Launch
from vllmd.engine.output import EngineOutput
from vllmd.engine.process import EngineProcess, RuntimeOptions, Spawner
from vllmd.engine.progress import BUSY_GRACE, Progress
from vllmd.errors import EngineUnavailable
from vllmd.events import Kind
from vllmd.instance.outcomes import DONE, End, Owner, Startup, Switch, Switched, Warmed
from vllmd.instance.states import InstanceState

S = InstanceState

Until = Callable[[Callable[[], bool]], Awaitable[None]]
# A lazy start's first request waits on this poll, so it is short once the engine said it is
# about to serve (EngineOutput.serving); before that (the whole load: a refused connect costs
# CPU, and vLLM binds its Unix socket long before it listens) /health is asked less often.
READY_POLL = 0.01
READY_POLL_LOADING = 0.1
TREE_NOTE = 1.0  # how often a starting engine's process tree is noted
OUTPUT_GRACE = 1.0
# The warm-up is part of the start: it gets what is left of startup_timeout, but never less than
# this (or startup_timeout itself, if shorter): a first inference on CPU takes seconds.
WARM_UP_MIN = 30.0
WAKE_WARM_UP = 120.0  # a woken engine's warm-up
WARM_UP_SLACK = 1.0  # httpx's own timeout is later: the warm-up's deadline is what ends it


class Session:
    def __init__(
        self,
        process: EngineProcess,
        address: EngineAddress,
        launch: Launch,
        options: RuntimeOptions,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.process = process
        self.log = log
        self.address = address
        self.sleep_mode = launch.sleep_mode  # started with vLLM's sleep mode
        self.sleep_level = 0  # while asleep: the level it sleeps at
        self.exited = anyio.Event()
        self._output: EngineOutput | None = None  # set while supervised
        self.client, self.upstream = make_client(
            address,
            connect_timeout=options.connect_timeout,
            max_connections=options.max_connections,
        )
        self.api = EngineAPI(self.client)
        self.pids_at_end: frozenset[int] = frozenset()  # what it had when it was closed

    @staticmethod
    async def spawn(
        spawner: Spawner,
        launch: Launch,
        address: EngineAddress,
        options: RuntimeOptions,
        log: structlog.typing.FilteringBoundLogger,
    ) -> Session:
        """Start the engine process (raises OSError/ConfigError; the address is then gone)."""
        try:
            process = await spawner(launch.argv, launch.env)
        except BaseException:
            discard_address(address)
            raise
        return Session(process, address, launch, options, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> frozenset[int]:
        return self.process.pids()

    def _processes(self) -> dict[int, float]:
        """pid -> start time of the engine's processes as known (the leader and descendants)."""
        record = self.process.record
        return {record.pid: record.create_time, **self.process.descendants}

    def exit_status(self) -> str:
        return exit_status(self.process.returncode)

    @asynccontextmanager
    async def supervised(
        self, output: EngineOutput, changed: Callable[[], None]
    ) -> AsyncIterator[None]:
        """While the block runs: the engine's output is pumped into `output` and its exit
        sets `exited` (and calls `changed`). After it: the engine's last words are read (they
        arrive just after its exit) and nothing of the engine is left."""
        try:
            async with anyio.create_task_group() as tg:
                output_done = anyio.Event()
                self._output = output
                tg.start_soon(output.pump, self.process, output_done, changed)
                tg.start_soon(self._watch_exit, changed)
                yield
                with anyio.move_on_after(OUTPUT_GRACE):
                    await output_done.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def run(self, owner: Owner, engine: EngineConfig, served_name: str) -> End:
        """The engine's whole life once spawned, inside `supervised`: wait for readiness,
        serve, sleep and wake, stop; or its crash."""
        proc = self.process
        started = anyio.current_time()

        def wanted() -> bool:
            return owner.want != "down"

        startup = await self.wait_ready(engine.startup_timeout, wanted, owner.until)
        if startup is not Startup.READY:
            error = f"engine for {owner.name} not ready within {engine.startup_timeout:g}s"
            return await self._not_started(owner, engine, startup, error)

        await proc.remember_descendants()
        left = engine.startup_timeout - (anyio.current_time() - started)
        timeout = max(left, min(WARM_UP_MIN, engine.startup_timeout))
        warmed = await self.warm_up(served_name, timeout, wanted, owner.until)
        if warmed.outcome is not Startup.READY:
            # /health answered but the engine cannot infer (a wedged CUDA-graph capture, an
            # engine core that died): a failed start, never READY; or it is no longer wanted.
            exited = f"; it exited with {self.exit_status()}" if self.exited.is_set() else ""
            error = f"engine for {owner.name} failed its warm-up: {warmed.error}{exited}"
            return await self._not_started(owner, engine, warmed.outcome, error)
        owner.ready(await self.api.version())  # STARTING -> READY
        while True:
            end = await self.serve(
                engine, lambda: owner.want != "up", lambda: owner.in_flight > 0, owner.until
            )
            if end is not End.STOPPED:
                break
            to_sleep = owner.want == "asleep"  # else to stop
            owner.transition(S.DRAINING)  # READY -> DRAINING
            with anyio.move_on_after(engine.drain_timeout):
                await owner.until(lambda: owner.in_flight == 0 or self.exited.is_set())
            if to_sleep and await self._sleep(owner):
                if not await self._wake(owner, served_name):
                    end = End.CRASHED  # it died asleep or waking
                    break
                if owner.want == "up" and self.sleep_level == 0:
                    continue  # awake and wanted: serving again
            if self.exited.is_set():
                end = End.CRASHED
                break
            owner.transition(S.STOPPING)  # DRAINING/SLEEPING/WAKING -> STOPPING
            await proc.terminate(engine.stop_timeout)
            return End.STOPPED
        if end is End.UNHEALTHY:
            error = f"engine for {owner.name} failed {engine.health_failures} health checks"
            owner.failed(error, "unhealthy")
            self.upstream.abort()  # its waiting requests fail now, not after the stop
            await proc.terminate(engine.stop_timeout)
            return end
        # The exit status is known (the leader was reaped): leave READY at once, before the
        # kernel log is read, the rest of the group killed and the last output drained.
        owner.failed(f"engine for {owner.name} exited with {self.exit_status()}", "crash")
        # The kernel kills before it logs: read its log once the group is gone.
        await proc.kill()
        oom = await proc.killed_by_oom()
        if oom:
            owner.oom_killed()
        reason = "oom" if oom else "crash"
        owner.tell(Kind.CRASHED, reason=reason, status=self.exit_status())
        return End.CRASHED

    async def _not_started(
        self, owner: Owner, engine: EngineConfig, outcome: Startup, error: str
    ) -> End:
        """A start that did not reach READY: stopped if no longer wanted; else killed, and a
        failed or timed-out start (`error`: what is told, unless the engine exited)."""
        proc = self.process
        if outcome is Startup.UNWANTED:
            owner.transition(S.STOPPING)  # STARTING -> STOPPING
            await proc.terminate(engine.stop_timeout)
            return End.STOPPED
        await proc.kill()  # the leader may be gone; its group may not be
        if outcome is Startup.EXITED:
            owner.failed(f"engine for {owner.name} exited with {self.exit_status()} while starting")
            return End.START_FAILED
        owner.failed(error)
        return End.START_TIMEOUT if outcome is Startup.TIMEOUT else End.START_FAILED

    async def _sleep(self, owner: Owner) -> bool:
        """DRAINING -> SLEEPING, confirmed by /is_sleeping. A refused or unconfirmed sleep
        escalates to a stop (returns False); so does an engine without sleep mode (the
        placer says so, once per model: it never plans a sleep for one)."""
        level = owner.sleep_to
        if self.exited.is_set() or not self.sleep_mode:
            return False
        if owner.in_flight:
            # The drain timed out: never sleep under a request; a stop is what a timed-out
            # drain means.
            owner.tell(Kind.SLEEP_FAILED, error="requests still in flight")
            return False
        slept = await self.sleep(level)
        if slept.outcome is not Switch.DONE:
            owner.tell(Kind.SLEEP_FAILED, error=slept.error, level=level)
            return False
        self.sleep_level = level
        owner.transition(S.SLEEPING, level=level)  # DRAINING -> SLEEPING
        return True

    async def _wake(self, owner: Owner, served_name: str) -> bool:
        """SLEEPING until wanted up (-> WAKING -> READY) or down (stays SLEEPING for the
        caller to stop). A failed wake leaves WAKING for the caller to stop and restart.
        Returns False when the engine died."""
        await owner.until(lambda: self.exited.is_set() or owner.want != "asleep")
        if self.exited.is_set():
            return False
        if owner.want == "down":
            return True
        owner.transition(S.WAKING)  # SLEEPING -> WAKING
        started = anyio.current_time()
        woke = await self.wake(self.sleep_level)
        if woke.outcome is not Switch.DONE:
            owner.failed(f"wake of {owner.name} failed: {woke.error}")
            owner.tell(Kind.WAKE_FAILED, error=woke.error)
            return not self.exited.is_set()
        warmed = await self.warm_up(
            served_name, WAKE_WARM_UP, lambda: owner.want != "down", owner.until
        )
        if warmed.outcome is Startup.EXITED:
            return False
        if warmed.outcome is Startup.UNWANTED:
            return True  # still WAKING: the caller stops it
        if warmed.outcome is not Startup.READY:  # awake but unable to infer (TP sleep leaks)
            owner.failed(f"wake of {owner.name} failed its warm-up: {warmed.error}")
            owner.tell(Kind.WAKE_FAILED, error=f"warm-up: {warmed.error}")
            return not self.exited.is_set()
        self.sleep_level = 0
        owner.woke(anyio.current_time() - started)  # WAKING -> READY
        return True

    async def wait_ready(self, timeout: float, wanted: Callable[[], bool], until: Until) -> Startup:
        """Poll /health (every READY_POLL) until it answers 200; `until(condition)` waits for
        the instance's next change, so a stop or the engine's exit is seen at once."""
        proc = self.process
        noted = anyio.current_time()
        with anyio.move_on_after(timeout):
            while True:
                if self.exited.is_set():
                    return Startup.EXITED
                if not wanted():
                    return Startup.UNWANTED
                serving = self._output is not None and self._output.serving
                if await self.api.healthy(timeout=1.0):
                    return Startup.READY
                if anyio.current_time() - noted >= TREE_NOTE:
                    # Workers appear while the engine loads: know them (and their groups)
                    # early, so an OOM kill or an orphan of a start is attributed.
                    noted = anyio.current_time()
                    await proc.remember_descendants()
                with anyio.move_on_after(READY_POLL if serving else READY_POLL_LOADING):
                    await until(partial(self._changed, serving, wanted))
        return Startup.TIMEOUT

    async def warm_up(
        self, served_name: str, timeout: float, wanted: Callable[[], bool], until: Until
    ) -> Warmed:
        """EngineAPI.warm_up within `timeout` (TIMEOUT), raced against the engine's exit
        (EXITED) and `wanted()` turning false (UNWANTED, which wins over whatever else ended
        it); `until(condition)` waits for the instance's next change. Whichever comes first
        cancels the other: an abandoned warm-up's request is closed."""
        ended: list[Warmed] = []

        async def attempt() -> None:
            with anyio.move_on_after(timeout):  # this deadline, not httpx's, ends a wedged one
                failure = await self.api.warm_up(served_name, timeout=timeout + WARM_UP_SLACK)
                ended.append(
                    Warmed(Startup.READY if failure is None else Startup.FAILED, failure or "")
                )
            if not ended:
                ended.append(Warmed(Startup.TIMEOUT, f"it did not answer within {timeout:g}s"))
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt)
            await until(lambda: self.exited.is_set() or not wanted())
            tg.cancel_scope.cancel()
        if not wanted():  # a stop asked meanwhile: no failed start, whatever the warm-up did
            return Warmed(Startup.UNWANTED)
        return ended[0] if ended else Warmed(Startup.EXITED)

    def _changed(self, serving: bool, wanted: Callable[[], bool]) -> bool:
        """What ends a wait between readiness polls: exit, unwanted, or the engine saying it
        is about to serve (polled faster from then on)."""
        now = self._output is not None and self._output.serving
        return self.exited.is_set() or not wanted() or now != serving

    async def serve(
        self,
        engine: EngineConfig,
        unwanted: Callable[[], bool],
        busy: Callable[[], bool],
        until: Until,
    ) -> End:
        """READY: a health check every engine.health_interval until the engine exits
        (CRASHED), fails engine.health_failures checks in a row (UNHEALTHY) or is `unwanted`
        (STOPPED: the instance says what is wanted instead). A failed check does not count
        while requests are in flight (`busy`) and the engine made progress since the previous
        check (vllmd.engine.progress): a busy engine may answer slowly, a wedged one not; for
        at most BUSY_GRACE in a row (processes that spin while the server is stuck)."""
        failures = 0
        excused_since: float | None = None  # failing since, excused by progress
        exited = self.exited
        progress = Progress(lambda: self.upstream.reads, self._processes)
        await progress.sample()
        while True:
            with anyio.move_on_after(engine.health_interval):
                await until(lambda: exited.is_set() or unwanted())
            if exited.is_set():
                return End.CRASHED
            if unwanted():
                return End.STOPPED
            healthy = await self.api.healthy(timeout=max(1.0, engine.health_interval))
            moved = await progress.sample()  # (at every check: the next compares with it)
            if healthy:
                failures, excused_since = 0, None
                continue
            now = anyio.current_time()
            excused_since = now if excused_since is None else excused_since
            if moved and busy() and now - excused_since < BUSY_GRACE:
                self.log.debug("health_check_failed_busy")  # late, but making progress
                failures = 0
                continue
            if exited.is_set():
                return End.CRASHED
            failures += 1
            self.log.warning("health_check_failed", failures=failures)
            if failures >= engine.health_failures:
                return End.UNHEALTHY

    async def sleep(self, level: int) -> Switched:
        """Put the engine to sleep, confirmed by /is_sleeping."""
        try:
            await self.api.sleep(level)
            if not await self.api.is_sleeping():
                return Switched(Switch.UNCONFIRMED, "/is_sleeping is false after /sleep")
        except EngineUnavailable as exc:
            return Switched(Switch.REFUSED if exc.refused else Switch.UNREACHABLE, str(exc))
        return DONE

    async def wake(self, level: int) -> Switched:
        """Wake the engine, confirmed by /is_sleeping."""
        try:
            await self.api.wake_up(level)
            if await self.api.is_sleeping():
                return Switched(Switch.UNCONFIRMED, "/is_sleeping is still true after /wake_up")
        except EngineUnavailable as exc:
            return Switched(Switch.REFUSED if exc.refused else Switch.UNREACHABLE, str(exc))
        return DONE

    async def close(self) -> None:
        """Make sure no process of this engine is left; close its client and socket."""
        await self.process.kill()
        # A GPU driver may hold their memory a while longer: a restart waits for it.
        self.pids_at_end = self.pids()
        await self.client.aclose()
        discard_address(self.address)

    async def _watch_exit(self, changed: Callable[[], None]) -> None:
        await self.process.wait()
        self.exited.set()
        changed()


def discard_address(address: EngineAddress) -> None:
    """Remove a Unix-socket address's private directory (nothing to do for TCP)."""
    if address.uds is not None:
        shutil.rmtree(address.uds.parent, ignore_errors=True)


def exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "no status"
    if returncode < 0:
        return f"signal {-returncode}"
    return f"status {returncode}"
