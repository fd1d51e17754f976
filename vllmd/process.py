"""Engine processes: spawn in their own process group, read their output, kill all of them.

The only module that creates or signals processes. vLLM runs as three processes (API server,
EngineCore, Worker); killing only the API server leaves the others holding memory, so every
signal goes to the whole process group, and descendants that left the group are found through
the process tree (the daemon is a child subreaper, so orphans re-parent to it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

PR_SET_CHILD_SUBREAPER = 36
ENGINE_OOM_SCORE_ADJ = 500
MAX_LINE = 16 * 1024
KILL_WAIT = 10.0  # after SIGKILL, only a process stuck in the kernel (a driver) takes longer
# Set in every engine's environment; inherited by all it forks, so its orphans are known.
MARKER_ENV = "VLLMD_INSTANCE"

# A tiny shell prelude makes the engine (and everything it forks) the kernel's preferred OOM
# victim before vLLM starts, without preexec_fn (unsafe in a threaded program).
log = structlog.get_logger("vllmd.process")
_OOM_PRELUDE = 'echo {adj} > /proc/self/oom_score_adj 2>/dev/null; exec "$@"'


def become_subreaper() -> bool:
    """Make orphaned engine grandchildren re-parent to this process (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def oom_kill_count() -> int | None:
    """The cgroup's `oom_kill` counter (cgroup v2), the kernel's record of OOM kills here."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().splitlines()[-1].split(":", 2)[2]
        events = Path("/sys/fs/cgroup", cgroup.lstrip("/"), "memory.events").read_text()
    except (OSError, IndexError):
        return None
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """Enough to find an engine again after a daemon crash, and never touch a reused pid."""

    pid: int
    pgid: int
    create_time: float


@dataclass
class EngineProcess:
    """One spawned engine: its leader process, process group and known descendants."""

    process: Process
    record: ProcessRecord
    oom_kills_at_start: int | None
    marker: str | None = None  # value of MARKER_ENV in the engine's (inherited) environment
    descendants: dict[int, float] = field(default_factory=dict)  # pid -> create_time

    @property
    def pid(self) -> int:
        return self.record.pid

    async def wait(self) -> int:
        return await self.process.wait()

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

    def killed_by_oom(self) -> bool:
        """SIGKILL that the kernel's OOM killer recorded while this engine ran."""
        if self.returncode != -signal.SIGKILL or self.oom_kills_at_start is None:
            return False
        now = oom_kill_count()
        return now is not None and now > self.oom_kills_at_start

    async def remember_descendants(self) -> None:
        """Note the current process tree, so members that leave the group can be killed."""
        found = await anyio.to_thread.run_sync(_descendants, self.pid, self.marker)
        self.descendants.update(found)

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
        its memory free."""
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


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _descendants(pid: int, marker: str | None) -> dict[int, float]:
    """The engine's process tree, plus orphans of it that re-parented to this daemon (the
    subreaper) after their parent exited: those are told apart by the marker they inherited."""
    found: dict[int, float] = {}
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
        with contextlib.suppress(psutil.Error):
            found[proc.pid] = proc.create_time()
    return found


def kill_pids(pids: Mapping[int, float]) -> None:
    """SIGKILL processes still alive with the same start time (a reused pid is never touched)."""
    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) <= 0.01:
                proc.kill()


def _wait_gone(pgid: int, pids: Mapping[int, float], timeout: float) -> None:
    """Poll until the group and the pids are gone, reaping those that re-parented to this
    daemon (the subreaper): nobody else will, and zombies would pile up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        alive = [p for p in pids if _alive(p, pids[p])]
        if not alive and not group_alive(pgid):
            return
        time.sleep(0.02)


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        same = abs(proc.create_time() - created) <= 0.01
        return bool(same and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies excluded)."""
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):  # it may exit meanwhile
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


async def spawn(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
) -> EngineProcess:
    """Start an engine in a new session (its own process group), output piped to us."""
    oom_before = oom_kill_count()
    wrapped = [
        "/bin/sh",
        "-c",
        _OOM_PRELUDE.format(adj=ENGINE_OOM_SCORE_ADJ),
        "vllmd-engine",
        *argv,
    ]
    process = await anyio.open_process(
        wrapped,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
    )
    try:
        created = psutil.Process(process.pid).create_time()
    except psutil.Error:
        created = 0.0
    record = ProcessRecord(pid=process.pid, pgid=process.pid, create_time=created)
    return EngineProcess(
        process=process, record=record, oom_kills_at_start=oom_before, marker=env.get(MARKER_ENV)
    )
