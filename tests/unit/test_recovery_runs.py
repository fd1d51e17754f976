"""Crash recovery's pass over the earlier runs of the state dir: a live process whose marker
names such a run is killed wherever it is (its own session, no record of it at all); one of
the current run, of another state dir's run, or with no marker is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import anyio
import psutil
import pytest

from vllmd.devices import DeviceSnapshot
from vllmd.engine.process import MARKER_ENV, boot_id
from vllmd.events import EventBus, Kind
from vllmd.store import EngineRecord, recover
from vllmd.store.runs import engine_marker

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]
EARLIER, CURRENT, ELSEWHERE = "0badc0de", "c0ffee00", "dec0ded0"  # ELSEWHERE: another state dir's


class NoGpus:
    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        return {}


def _start(marker: str | None) -> subprocess.Popen[bytes]:
    """A process in a session of its own (in no group a record names) with `marker`."""
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    if marker is not None:
        env[MARKER_ENV] = marker
    return subprocess.Popen(SLEEPER, env=env, start_new_session=True)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _until_environ(procs: list[subprocess.Popen[bytes]]) -> None:
    """Until each has exec'd the sleeper (its environment is its own, not the fork's)."""
    deadline = time.monotonic() + 10
    for proc in procs:
        while "time.sleep" not in " ".join(psutil.Process(proc.pid).cmdline()):
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _events(bus: EventBus) -> list[Mapping[str, object]]:
    return [{"model": e.model, **e.fields} for e in bus.history if e.kind is Kind.ORPHANS_KILLED]


def test_a_process_marked_by_an_earlier_run_is_killed_and_no_other(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """Regression: an engine whose `spawned` record never reached the store was never killed."""
    earlier = _start(engine_marker(EARLIER, "llama-3.1-8b"))
    current = _start(engine_marker(CURRENT, "llama-3.1-8b"))
    elsewhere = _start(engine_marker(ELSEWHERE, "m"))
    unmarked = _start(None)
    old_form = _start(f"{EARLIER}-0123456789ab")  # not of the form <run>.<model>.<token>
    started += [earlier, current, elsewhere, unmarked, old_form]
    _until_environ(started)
    bus = EventBus()
    done = anyio.run(recover, [], NoGpus(), bus, frozenset({EARLIER}))
    assert done == frozenset()  # no record to be done with
    assert earlier.wait(5) == -signal.SIGKILL
    time.sleep(0.2)
    assert [p.poll() for p in (current, elsewhere, unmarked, old_form)] == [None] * 4
    [told] = _events(bus)
    assert told["model"] == "llama-3.1-8b" and told["pids"] == [earlier.pid]
    assert told["pgid"] == earlier.pid and told["survivors"] == []


def test_a_process_of_an_earlier_run_outside_a_recorded_engines_group_is_killed_as_its(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """Regression: a child that left the group before the daemon noted it was found by no
    record (the marker was checked only for the group's members)."""
    marker = engine_marker(EARLIER, "m")
    escaped = _start(marker)
    started.append(escaped)
    _until_environ(started)
    with subprocess.Popen(["true"]) as leader:  # the engine's leader: gone (and reaped)
        assert leader.wait(5) == 0
    created = psutil.Process(escaped.pid).create_time()
    record = EngineRecord("m", leader.pid, leader.pid, created - 1, boot_id(), marker=marker)
    bus = EventBus()
    assert anyio.run(recover, [record], NoGpus(), bus, frozenset({EARLIER})) == {"m"}
    assert escaped.wait(5) == -signal.SIGKILL
    [told] = _events(bus)
    assert told == {"model": "m", "pids": [escaped.pid], "pgid": leader.pid, "survivors": []}


def test_a_recorded_engines_marker_alone_finds_no_process_outside_its_group(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """Where the runs are not known (none listed), only the group and the recorded processes
    are killed: as before runs were listed."""
    marker = engine_marker(EARLIER, "m")
    proc = _start(marker)
    started.append(proc)
    _until_environ(started)
    with subprocess.Popen(["true"]) as leader:
        assert leader.wait(5) == 0
    created = psutil.Process(proc.pid).create_time()
    record = EngineRecord("m", leader.pid, leader.pid, created - 1, boot_id(), marker=marker)
    assert anyio.run(recover, [record], NoGpus(), EventBus(), frozenset()) == {"m"}
    time.sleep(0.2)
    assert proc.poll() is None
