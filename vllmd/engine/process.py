"""Engine processes: spawn in their own process group, read their output, kill all of them.

The only module that creates, signals or reaps processes. vLLM runs as three processes (API
server, EngineCore, Worker); killing only the API server leaves the others holding memory, so
every signal goes to the whole process group, and descendants that left the group are found
through the process tree (the daemon is a child subreaper, so orphans re-parent to it, and the
`Reaper` collects those that die). The tree is noted every TREE_WATCH while the engine runs, and
what of it is alive told to the state store (a `DescendantsSink`): after a daemon crash, recovery
kills those too, by pid and start time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from vllmd.config.cpus import OMP_BIND, parse_cpulist
from vllmd.engine.kernel_log import KernelLog, KernelLogOpener, Kmsg, oom_victims
from vllmd.engine.reaper import Reaper

if TYPE_CHECKING:  # imported where used: the daemon's start has no engine yet
    import psutil

ENGINE_OOM_SCORE_ADJ = 500
MAX_LINE = 16 * 1024
KILL_WAIT = 10.0  # after SIGKILL, only a process stuck in the kernel (a driver) takes longer
TREE_WATCH = 10.0  # how often a running engine's process tree is noted (beside the session's)
# Set in every engine's environment; inherited by all it forks, so its orphans are known.
MARKER_ENV = "VLLMD_INSTANCE"

# A tiny shell prelude makes the engine (and everything it forks) the kernel's preferred OOM
# victim before vLLM starts, without preexec_fn (unsafe in a threaded program).
log = structlog.get_logger("vllmd.process")
_OOM_PRELUDE = 'echo {adj} > /proc/self/oom_score_adj 2>/dev/null; exec "$@"'


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """What every engine session shares: where engine sockets live and how to reach engines."""

    runtime_dir: Path
    connect_timeout: float = 5.0
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """Enough to find an engine again after a daemon crash, and never touch a reused pid."""

    pid: int
    pgid: int
    create_time: float  # unix seconds (psutil's create_time)
    boot_id: str = ""  # the kernel's boot id: a record from another boot names no process
    marker: str = ""  # MARKER_ENV's value in the engine's environment (inherited by its tree)

    def fields(self) -> dict[str, Any]:
        """As the `spawned` event tells it (what the state store records)."""
        return {
            "pid": self.pid,
            "pgid": self.pgid,
            "start_time": self.create_time,
            "boot_id": self.boot_id,
            "marker": self.marker,
        }


# Told an engine's living descendants (its leader's pid and start time, then pid -> start time)
# each time they change, and None once the engine is gone: the state store, for crash recovery.
DescendantsSink = Callable[[int, float, Mapping[int, float] | None], None]


@dataclass
class EngineProcess:
    """One spawned engine: its leader process, process group and known descendants."""

    process: Process
    record: ProcessRecord
    marker: str | None = None  # value of MARKER_ENV in the engine's (inherited) environment
    descendants: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    reaper: Reaper | None = None  # told the groups of descendants that left the engine's
    kernel_log: KernelLog | None = None  # opened before the spawn; closed by kill()
    sink: DescendantsSink | None = None  # told the living descendants as they change
    tree_watch: float = TREE_WATCH
    _oom_killed: set[int] = field(default_factory=set, init=False)  # pids the kernel named
    _told: dict[int, float] | None = field(default=None, init=False)  # what the sink last got
    _watching: bool = field(default=False, init=False)

    @property
    def pid(self) -> int:
        return self.record.pid

    def pids(self) -> frozenset[int]:
        """The engine's processes as known: the leader and its remembered descendants."""
        return frozenset({self.record.pid, *self.descendants})

    async def wait(self) -> int:
        """The leader's exit status, once it exits. Meanwhile (in the first caller) the process
        tree is noted every `tree_watch`, so a process that leaves the engine's group later in
        its life is known to kill() and recorded by the sink."""
        if self._watching:
            return await self.process.wait()
        self._watching = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_tree)
            status = await self.process.wait()
            tg.cancel_scope.cancel()
        return status

    async def _watch_tree(self) -> None:
        while True:
            await anyio.sleep(self.tree_watch)
            await self.remember_descendants()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def lines(self) -> AsyncIterator[str]:
        """The engine's merged stdout/stderr, line by line, until it closes."""
        assert self.process.stdout is not None
        stream = BufferedByteReceiveStream(self.process.stdout)
        while True:
            try:
                raw = await stream.receive_until(b"\n", MAX_LINE)
            except anyio.DelimiterNotFound:
                raw = await stream.receive(MAX_LINE)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            yield raw.decode("utf-8", "replace").rstrip("\r")

    async def killed_by_oom(self) -> bool:
        """True when the kernel's log says its OOM killer killed one of this engine's
        processes (the leader or a known descendant) since the spawn. False where that
        cannot be told (the log unreadable): the caller calls it a crash."""
        await self._read_kernel_log()
        return bool(self._oom_killed & {self.pid, *self.descendants})

    async def _read_kernel_log(self) -> None:
        if self.kernel_log is not None:
            messages = await anyio.to_thread.run_sync(self.kernel_log.read)
            self._oom_killed |= oom_victims(messages)

    async def remember_descendants(self) -> None:
        """Note the current process tree, so members that leave the group can be killed (and
        reaped once dead: their groups are adopted by the reaper)."""
        found = await anyio.to_thread.run_sync(_descendants, self.pid, self.marker)
        self.descendants.update({pid: created for pid, (created, _) in found.items()})
        if self.reaper is not None:
            for _, pgid in found.values():
                self.reaper.adopt(pgid)
        if self.sink is not None:
            living = await anyio.to_thread.run_sync(_living, dict(self.descendants))
            if living != self._told:
                self._told = living
                self.sink(self.record.pid, self.record.create_time, living)

    async def terminate(self, stop_timeout: float) -> None:
        """SIGTERM the group, wait up to stop_timeout, SIGKILL the group and every known
        descendant, then wait for the leader. Safe to call more than once. Cancelling it (a
        forced shutdown) skips the rest of the wait, never the SIGKILL."""
        try:
            if self.returncode is None:
                await self.remember_descendants()
            signal_group(self.record.pgid, signal.SIGTERM)
            with anyio.move_on_after(stop_timeout):
                await self.process.wait()
        finally:
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL everything that belongs to this engine, then wait (bounded) until none of
        it is left: the leader reaped, the group empty, the descendants gone. Only then is
        its memory free. The kernel log is read one last time (see killed_by_oom) and closed."""
        with anyio.CancelScope(shield=True):
            if self.returncode is None:
                await self.remember_descendants()
            signal_group(self.record.pgid, signal.SIGKILL)
            pids = dict(self.descendants)
            await anyio.to_thread.run_sync(kill_pids, pids)
            with anyio.move_on_after(KILL_WAIT):
                await self.process.wait()
                await anyio.to_thread.run_sync(_wait_gone, self.record.pgid, pids, KILL_WAIT)
            left = await anyio.to_thread.run_sync(group_alive, self.record.pgid)
            if self.returncode is None or left:
                log.error("engine_processes_survive_sigkill", pgid=self.record.pgid)
            await self.process.aclose()
            if self.sink is not None and self._told is not None:
                self._told = None
                self.sink(self.record.pid, self.record.create_time, None)
            await self._read_kernel_log()
            if self.kernel_log is not None:
                self.kernel_log.close()
                self.kernel_log = None


@functools.cache
def boot_id() -> str:
    """This boot's id (Linux); "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _descendants(pid: int, marker: str | None) -> dict[int, tuple[float, int]]:
    """The engine's process tree, plus orphans of it that re-parented to this daemon (the
    subreaper) after their parent exited: those are told apart by the marker they inherited.
    pid -> (create_time, pgid)."""
    import psutil

    found: dict[int, tuple[float, int]] = {}
    candidates: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        candidates += psutil.Process(pid).children(recursive=True)
    if marker is not None:
        with contextlib.suppress(psutil.Error):
            for orphan in psutil.Process().children(recursive=False):
                with contextlib.suppress(psutil.Error):
                    if orphan.pid != pid and orphan.environ().get(MARKER_ENV) == marker:
                        candidates += [orphan, *orphan.children(recursive=True)]
    for proc in candidates:
        with contextlib.suppress(psutil.Error, OSError):
            found[proc.pid] = (proc.create_time(), os.getpgid(proc.pid))
    return found


def kill_pids(pids: Mapping[int, float]) -> None:
    """SIGKILL processes still alive with the same start time (a reused pid is never touched)."""
    import psutil

    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) <= 0.01:
                proc.kill()


def _living(pids: Mapping[int, float]) -> dict[int, float]:
    """Those of `pids` alive with the same start time (a pid reused since is not theirs)."""
    return {pid: created for pid, created in pids.items() if _alive(pid, created)}


def _wait_gone(pgid: int, pids: Mapping[int, float], timeout: float) -> None:
    """Poll until the group and the pids are gone (dead: the Reaper collects the zombies
    among the daemon's children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p, pids[p])]
        if not alive and not group_alive(pgid):
            return
        time.sleep(0.02)


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        same = abs(proc.create_time() - created) <= 0.01
        return bool(same and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies excluded)."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):  # it may exit meanwhile
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


async def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path | None = None,
    *,
    reaper: Reaper | None = None,
    kernel_log: KernelLogOpener = Kmsg,
    sink: DescendantsSink | None = None,
    tree_watch: float = TREE_WATCH,
) -> EngineProcess:
    """Start an engine in a new session (its own process group), output piped to us. The
    reaper, when given, adopts the engine's group; the kernel log is opened first, so an OOM
    kill at any time of the engine's life can be attributed to it; the sink, when given, is
    told its living descendants as they are seen (every `tree_watch` while it runs)."""
    log_reader = await anyio.to_thread.run_sync(kernel_log)
    wrapped = [
        "/bin/sh",
        "-c",
        _OOM_PRELUDE.format(adj=ENGINE_OOM_SCORE_ADJ),
        "vllmd-engine",
        *argv,
    ]
    try:
        process = await anyio.open_process(
            wrapped,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
        )
    except BaseException:
        log_reader.close()
        raise
    if reaper is not None:
        reaper.adopt(process.pid, leader=process.pid)
    _bind(process.pid, env)
    import psutil

    try:
        created = psutil.Process(process.pid).create_time()
    except psutil.Error:
        created = 0.0
    record = ProcessRecord(process.pid, process.pid, created, boot_id(), env.get(MARKER_ENV, ""))
    return EngineProcess(
        process=process,
        record=record,
        marker=env.get(MARKER_ENV),
        reaper=reaper,
        kernel_log=log_reader,
        sink=sink,
        tree_watch=tree_watch,
    )


def _bind(pid: int, env: Mapping[str, str]) -> None:
    """A cpu engine's CPU affinity is its slice (VLLM_CPU_OMP_THREADS_BIND, which vllmd sets):
    set on the shell before it execs the engine, so the engine and all it forks inherit it.
    (The shell's prelude is one `echo`: the engine starts no thread before this returns.)"""
    bind = env.get(OMP_BIND, "")
    if not bind or bind == "auto":
        return
    try:
        os.sched_setaffinity(pid, parse_cpulist(bind))
    except (OSError, ValueError) as exc:  # gone already, or cores this host does not have
        log.warning("affinity_not_set", pid=pid, cores=bind, error=str(exc))


# How an engine process is started (argv, environment): `spawn` with the daemon's reaper and
# kernel log, or a test's fake. Injected through the context.
Spawner = Callable[[Sequence[str], Mapping[str, str]], Awaitable[EngineProcess]]
