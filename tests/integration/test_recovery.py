"""Crash recovery on real processes: a previous run's engine (a fake engine whose worker holds
fake-GPU memory, in its own process group) is killed with its whole group and its memory seen
free; a reused pid, a record of another boot and a foreign GPU process are never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from tests.fakes.fake_gpu import FakeGpu
from vllmd.devices import DeviceSnapshot
from vllmd.engine.process import MARKER_ENV, boot_id
from vllmd.events import EventBus, Kind
from vllmd.store import EngineRecord, recover
from vllmd.store.recovery import find

pytestmark = pytest.mark.anyio
FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "fake_engine.py"
GiB = 2**30
MARKER = "test-recovery-engine"


def _group_alive(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@pytest.fixture
def orphan(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], FakeGpu]]:
    """A fake engine left behind by a dead daemon: its own session, a worker holding 4 GiB."""
    gpu = FakeGpu(tmp_path / "gpu")
    env = {
        **os.environ,
        **gpu.env(),
        "CUDA_VISIBLE_DEVICES": "0",
        "FAKE_GPU_BYTES": str(4 * GiB),
        MARKER_ENV: MARKER,  # as vllmd gives its engines: inherited by the worker
    }
    argv = [sys.executable, str(FAKE_ENGINE), "--model", "m", "--uds", str(tmp_path / "e.sock")]
    engine = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 20
    while not gpu.workers("m") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gpu.workers("m"), "the fake engine's worker never took its memory"
    yield engine, gpu
    for pid in _group_alive(engine.pid):
        os.kill(pid, signal.SIGKILL)
    engine.wait(5)


def _record(proc: subprocess.Popen[bytes], **kw: object) -> EngineRecord:
    fields: dict[str, object] = {
        "model": "m",
        "pid": proc.pid,
        "pgid": proc.pid,
        "start_time": psutil.Process(proc.pid).create_time(),
        "boot_id": boot_id(),
        "marker": MARKER,
        **kw,
    }
    return EngineRecord(**fields)  # type: ignore[arg-type]


async def test_a_recorded_engine_and_its_group_are_killed_and_their_memory_seen_free(
    orphan: tuple[subprocess.Popen[bytes], FakeGpu],
) -> None:
    engine, gpu = orphan
    gpu.set_release(1.0)  # the driver lists a dead process for a second more
    foreign = gpu.add_foreign(2 * GiB)
    members = _group_alive(engine.pid)
    assert len(members) >= 2  # the engine and its worker
    bus = EventBus()
    heard: list[tuple[Kind, dict[str, object]]] = []
    bus.on_event(lambda e: heard.append((e.kind, dict(e.fields))))
    done = await recover([_record(engine)], gpu, bus)
    assert done == {"m"}
    engine.wait(5)  # our child: reap it
    assert _group_alive(engine.pid) == []
    pids_on_gpu = {p.pid for s in (await gpu.snapshot()).values() for p in s.processes}
    assert not pids_on_gpu & set(members)  # their memory is free
    assert foreign in pids_on_gpu  # another program's process: untouched
    [(kind, fields)] = heard
    assert kind is Kind.ORPHANS_KILLED
    assert set(members) <= set(fields["pids"])  # type: ignore[call-overload]
    assert fields["survivors"] == []


async def test_a_reused_pid_or_another_boots_record_is_never_touched(
    orphan: tuple[subprocess.Popen[bytes], FakeGpu],
) -> None:
    engine, gpu = orphan
    reused = _record(engine, start_time=psutil.Process(engine.pid).create_time() - 100)
    other_boot = _record(engine, model="n", boot_id="another-boot")
    assert await anyio.to_thread.run_sync(find, [reused, other_boot], boot_id()) == []
    await recover([reused, other_boot], gpu, EventBus())
    assert engine.poll() is None and len(_group_alive(engine.pid)) >= 2


async def test_a_group_whose_leader_died_still_has_its_members_killed(
    orphan: tuple[subprocess.Popen[bytes], FakeGpu],
) -> None:
    engine, gpu = orphan
    record = _record(engine)
    workers = [p for p in _group_alive(engine.pid) if p != engine.pid]
    engine.send_signal(signal.SIGKILL)  # the leader goes; its worker stays in the group
    engine.wait(5)
    assert workers and all(psutil.pid_exists(p) for p in workers)
    await recover([record], gpu, EventBus())
    assert _group_alive(engine.pid) == []


def test_a_leaderless_group_that_is_not_the_engines_is_never_touched() -> None:
    """The recorded group number, reused by another program whose group lost its leader (a
    shell that backgrounded a job): its members show no sign of being the engine's."""
    with subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, start_new_session=True
    ) as shell:
        assert shell.stdout is not None
        sleeper = int(shell.stdout.readline())
        created = psutil.Process(shell.pid).create_time()
    try:
        record = EngineRecord("m", shell.pid, shell.pid, created, boot_id(), marker=MARKER)
        assert find([record], boot_id()) == []
        anyio.run(recover, [record], FakeGpuless(), EventBus())
        assert psutil.Process(sleeper).status() != psutil.STATUS_ZOMBIE
    finally:
        os.kill(sleeper, signal.SIGKILL)


class FakeGpuless:
    """A probe with no GPU at all (a cpu-only host)."""

    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        return {}
