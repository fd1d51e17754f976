"""Crash recovery (docs/design.md "Supervision"): after the daemon died without stopping its
engines, their process groups may live on, holding GPU memory no one accounts for. At start, before
anything is scheduled, every engine the store recorded that still exists on this boot is
killed with its whole group; then the devices are read again to verify that none of those
processes still holds memory. Processes on the GPUs that are not such engines are another
program's: counted as foreign memory (the ledger, the `device_memory_foreign_bytes` alert),
never killed.

A record names a process only on the boot it was made (boot id), and only while the leader,
if alive, has the recorded start time: a pid reused by another program is never touched. A
leader that is gone may leave members of its group alive, but once the whole group was gone its
number may name another program's group: then only members that show they are the engine's
(its marker in their environment, or vLLM's renamed processes started within WINDOW of it)
are killed. Beside the group, the engine's other processes the record lists (as the daemon saw
them while the engine ran) are killed where one is alive with its recorded start time: so a
process that left the engine's group is not left behind, and a pid reused since is not touched.

Processes are also found by the marker they inherited, in any group: one that names an earlier
run of this state dir on this boot (runs.py) is killed, a recorded engine's or not. So an engine
whose `spawned` event was never written, and a child that left the engine's group before the
daemon first noted it, are killed too; the current run's engines and another state dir's never
are. A process whose environment cannot be read (vLLM's renamed processes overwrite it) is
found by the other ways alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import structlog

from vllmd.devices import DeviceProbe
from vllmd.engine.process import MARKER_ENV, boot_id
from vllmd.errors import DeviceError
from vllmd.events import EventBus, Kind
from vllmd.store.records import EngineRecord
from vllmd.store.runs import model_of, run_of

if TYPE_CHECKING:  # imported where used: recovery has work only after a crash
    import psutil

log = structlog.get_logger("vllmd.recovery")

KILL_WAIT = 10.0  # seconds for killed orphans to be gone
WINDOW = 900.0  # seconds after its leader within which an engine's own processes start
VERIFY_TRIES = 6  # device readings (0.5 s apart) for their memory to show free
_SAME_START = 0.01  # psutil create_time tolerance (s)


@dataclass(frozen=True, slots=True)
class Orphans:
    """A recorded engine's processes still alive: pid -> start time."""

    record: EngineRecord
    pids: Mapping[int, float]


def find(
    records: Iterable[EngineRecord],
    boot: str,
    window: float = WINDOW,
    runs: frozenset[str] = frozenset(),
) -> list[Orphans]:
    """The recorded engines with processes still alive on this boot, and the engines of the
    earlier `runs` (of this boot) found by their marker alone (blocking: psutil)."""
    import psutil

    found = []
    groups: dict[int, list[psutil.Process]] = {}
    running: dict[int, float] = {}  # pid -> start time, zombies left out
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE:
                groups.setdefault(os.getpgid(proc.pid), []).append(proc)
                running[proc.pid] = proc.info["create_time"]
    here = [r for r in records if r.boot_id == boot]  # another boot's numbers name others now
    marked = _marked(groups, runs)
    for record in here:
        pids = _group_members(record, groups.get(record.pgid, []), window)
        pids.update(descendants_alive(record, running))
        pids.update(marked.pop(record.marker, {}))
        if pids:
            found.append(Orphans(record, pids))
    found.extend(_unrecorded(marker, pids, boot) for marker, pids in marked.items())
    return found


def _marked(
    groups: Mapping[int, list[psutil.Process]], runs: frozenset[str]
) -> dict[str, dict[int, float]]:
    """The processes whose marker names one of `runs`, in any group: marker -> pid -> start
    time. One whose environment cannot be read (vLLM's renamed processes overwrite it;
    another user's) is not among them."""
    import psutil

    found: dict[str, dict[int, float]] = {}
    if not runs:
        return found
    for members in groups.values():
        for proc in members:
            with contextlib.suppress(psutil.Error, OSError):
                marker = proc.environ().get(MARKER_ENV, "")
                if run_of(marker) in runs:
                    found.setdefault(marker, {})[proc.pid] = proc.info["create_time"]
    return found


def _unrecorded(marker: str, pids: Mapping[int, float], boot: str) -> Orphans:
    """An engine of an earlier run that no record names (its `spawned` event was never
    written), as its processes tell it: the oldest is taken for its leader."""
    leader = min(pids, key=lambda pid: (pids[pid], pid))
    try:
        pgid = os.getpgid(leader)
    except OSError:
        pgid = leader
    record = EngineRecord(model_of(marker), leader, pgid, pids[leader], boot, marker=marker)
    return Orphans(record, dict(pids))


def _group_members(
    record: EngineRecord, members: list[psutil.Process], window: float
) -> dict[int, float]:
    """The members of the recorded group that are the engine's: pid -> start time."""
    leader = next((p for p in members if p.pid == record.pid), None)
    if leader is not None:
        if abs(leader.info["create_time"] - record.start_time) > _SAME_START:
            return {}  # the pid was reused by another program
        ours = [p for p in members if p.info["create_time"] >= record.start_time - _SAME_START]
    else:  # the group's number may have been reused since: each member must show it is ours
        ours = [p for p in members if _engines_own(p, record, window)]
    return {p.pid: p.info["create_time"] for p in ours}


def descendants_alive(record: EngineRecord, running: Mapping[int, float]) -> dict[int, float]:
    """The engine's recorded processes that are alive now (`running`: pid -> start time):
    those whose pid runs with the recorded start time. A pid that runs with another start
    time was reused by another program: never the engine's."""
    return {
        pid: running[pid]
        for pid, created in record.descendants
        if pid in running and abs(running[pid] - created) <= _SAME_START
    }


def _engines_own(proc: psutil.Process, record: EngineRecord, window: float) -> bool:
    """A member of a leaderless group is the recorded engine's when it carries the engine's
    marker in its environment, or (vLLM's renamed processes overwrite their environment) is
    one of vLLM's processes started while that engine started."""
    import psutil

    created = proc.info["create_time"]
    if not record.start_time - _SAME_START <= created <= record.start_time + window:
        return False
    with contextlib.suppress(psutil.Error, OSError):
        if record.marker and proc.environ().get(MARKER_ENV) == record.marker:
            return True
        cmdline = proc.cmdline()
        return proc.name().startswith("VLLM::") or bool(cmdline and cmdline[0].startswith("VLLM::"))
    return False


def kill(orphans: Iterable[Orphans], timeout: float = KILL_WAIT) -> list[int]:
    """SIGKILL every orphan (start time checked again), then wait until they are gone;
    the pids still alive after `timeout` are returned (blocking)."""
    import psutil

    pids: dict[int, float] = {}
    for each in orphans:
        pids.update(each.pids)
    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) <= _SAME_START:
                proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p, c in pids.items() if _alive(p, c)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return bool(
            abs(proc.create_time() - created) <= _SAME_START
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


async def recover(
    records: list[EngineRecord],
    probe: DeviceProbe,
    events: EventBus,
    runs: frozenset[str] = frozenset(),
) -> frozenset[str]:
    """Kill the engines a previous run left behind (those recorded, and any process marked by
    one of the earlier `runs` of the state dir on this boot) and verify their device memory is
    free. Returns the models whose records are done with: all but those with a process that
    survived SIGKILL (reported; tried again at the next start)."""
    if not records and not runs:
        return frozenset()
    stuck: set[str] = set()
    orphans = await anyio.to_thread.run_sync(find, records, boot_id(), WINDOW, runs)
    if orphans:
        survivors = await anyio.to_thread.run_sync(kill, orphans)
        killed = {p for o in orphans for p in o.pids}
        for _ in range(VERIFY_TRIES):  # a driver may report a process a moment after it died
            on_devices = await _device_pids(probe)
            holding = sorted(killed & on_devices)
            if not holding:
                break
            await anyio.sleep(0.5)
        for each in orphans:
            events.emit(
                Kind.ORPHANS_KILLED,
                each.record.model,
                pids=sorted(each.pids),
                pgid=each.record.pgid,
                survivors=sorted(set(survivors) & set(each.pids)),
            )
            if set(survivors) & set(each.pids):
                stuck.add(each.record.model)
        if survivors or holding:
            log.error("orphans_survive", survivors=survivors, still_on_devices=holding)
        foreign = sorted(on_devices - killed)
        if foreign:
            log.warning("foreign_device_processes", pids=foreign)
    return frozenset(r.model for r in records) - stuck


async def _device_pids(probe: DeviceProbe) -> set[int]:
    """The pids on any device now (a probe that fails tells none: logged by the probe)."""
    try:
        snapshots = await probe.snapshot()
    except DeviceError as exc:
        log.warning("recovery_probe_failed", error=str(exc))
        return set()
    return {p.pid for snap in snapshots.values() for p in snap.processes}
