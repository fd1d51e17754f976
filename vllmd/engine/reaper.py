"""The daemon as a child subreaper, and the reaper of dead engine processes.

As a child subreaper the daemon inherits the engine processes whose parent exits first; the
`Reaper` waits for those (and only those) so none stays a zombie.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Mapping
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

PR_SET_CHILD_SUBREAPER = 36
# How often the reaper looks for dead engine processes: a zombie lives about this long at most.
REAP_INTERVAL = 0.25
log = structlog.get_logger("vllmd.reaper")


def become_subreaper() -> bool:
    """Make orphaned engine grandchildren re-parent to this process (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Reaper:
    """Waits for the engine processes that died as children of the daemon.

    As a child subreaper the daemon inherits the engine processes whose parent exits first
    (vLLM's Worker, once its EngineCore is gone); nobody else will wait for them, so each
    would stay a zombie until the daemon stops. Reaped: a zombie child of the daemon whose
    process group is (or was) an engine's group, or a group a known descendant of an engine
    moved to. Never an engine leader (its status belongs to the Process that awaits it) and
    never anything else: in tests the daemon shares its process with the test runner.

    SIGCHLD cannot tell us when: the event loop's child watcher owns it (uvloop's libuv
    installs its own handler, and replacing it would stop engine leaders from being awaited).
    So the reaper looks every REAP_INTERVAL while engine groups exist, and only walks its
    children when the kernel says one of them is waiting to be reaped.
    """

    def __init__(self, interval: float = REAP_INTERVAL) -> None:
        self.interval = interval
        self._groups: dict[int, int | None] = {}  # pgid -> the leader awaited elsewhere
        self._wake: anyio.Event | None = None

    @property
    def groups(self) -> frozenset[int]:
        """Process groups whose dead members are reaped (until the group is gone)."""
        return frozenset(self._groups)

    def adopt(self, pgid: int, *, leader: int | None = None) -> None:
        """Reap this group's dead members from now on, except `leader`."""
        if pgid <= 1 or pgid == os.getpgrp():
            return  # the daemon's own group is never an engine's
        if self._groups.get(pgid) is None:
            self._groups[pgid] = leader
        if self._wake is not None:
            self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._groups:
                self._wake = anyio.Event()
                await self._wake.wait()
            await self.reap()
            await anyio.sleep(self.interval)

    async def reap(self) -> list[int]:
        """Reap what is dead now; forget the groups that no longer exist. Returns the pids."""
        groups = dict(self._groups)
        reaped, gone = await anyio.to_thread.run_sync(_reap, groups)
        for pgid in gone:  # empty for good: its id is not reused while a member is left
            self._groups.pop(pgid, None)
        for pid, pgid, status in reaped:
            log.debug("reaped", pid=pid, pgid=pgid, status=status)
        return [pid for pid, _, _ in reaped]


def _reap(groups: Mapping[int, int | None]) -> tuple[list[tuple[int, int, int]], set[int]]:
    """Blocking: reap the zombie children in `groups` (never a leader) by pid; also return
    the groups that have no member left (zombies count as members)."""
    gone = set()
    for pgid in groups:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            gone.add(pgid)
        except PermissionError:
            pass
    reaped: list[tuple[int, int, int]] = []
    if not _zombie_child_waiting():
        return reaped, gone
    leaders = {leader for leader in groups.values() if leader is not None}
    for pid in _children():
        stat = _stat(pid)
        if stat is None or stat[0] != "Z" or stat[1] not in groups or pid in leaders:
            continue
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue  # someone else's after all
        if got == pid:
            reaped.append((pid, stat[1], os.waitstatus_to_exitcode(status)))
    return reaped, gone


def _zombie_child_waiting() -> bool:
    """True when any child of this process has exited and is not reaped yet (peeked at with
    WNOWAIT: its status stays for whoever waits for it)."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False  # no children at all
    return info is not None


def _children() -> set[int]:
    """Pids of this process's children: from /proc/self/task/*/children where the kernel has
    it (CONFIG_PROC_CHILDREN), else from a scan of every process."""
    tasks = Path("/proc/self/task")
    if not (tasks / str(os.getpid()) / "children").exists():
        import psutil  # on first use: an import the daemon's start does without

        with contextlib.suppress(psutil.Error):
            return {child.pid for child in psutil.Process().children()}
        return set()
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):  # the thread may have ended meanwhile
                pids.update(int(pid) for pid in (task / "children").read_text().split())
    return pids


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, pgid) from /proc/PID/stat; a zombie keeps both until it is reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the name may contain spaces and parens
    try:
        return fields[0], int(fields[2])
    except (IndexError, ValueError):
        return None
