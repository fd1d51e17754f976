"""A running engine's process tree is noted all its life (issue 21, item 7): a child that leaves
the engine's process group long after the start is known, told to the sink (the state store)
with its start time, and killed with the engine; the sink hears last that the engine is gone."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import anyio
import psutil
import pytest

from tests.integration.harness import eventually
from vllmd.engine.process import MARKER_ENV, spawn

pytestmark = pytest.mark.anyio

# An engine that, a while after its start, starts a child in a session of its own and without
# the marker in its environment (vLLM's renamed processes overwrite theirs), then sleeps.
ENGINE = """
import os, subprocess, sys, time
time.sleep(1.0)
env = {k: v for k, v in os.environ.items() if k != "VLLMD_INSTANCE"}
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env=env,
                         start_new_session=True)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(child.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""


class Recorder:
    """A sink that keeps what it is told: (leader pid, leader start time, processes or None)."""

    def __init__(self) -> None:
        self.told: list[tuple[int, float, dict[int, float] | None]] = []

    def __call__(self, pid: int, start_time: float, processes: Mapping[int, float] | None) -> None:
        self.told.append((pid, start_time, None if processes is None else dict(processes)))

    def last(self) -> dict[int, float]:
        return (self.told[-1][2] or {}) if self.told else {}


async def test_a_child_that_leaves_the_group_later_is_recorded_and_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    sink = Recorder()
    env = {**os.environ, MARKER_ENV: "m-test"}
    engine = await spawn(
        [sys.executable, "-c", ENGINE, str(pid_file)], env, sink=sink, tree_watch=0.2
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.wait)  # nothing else notes the tree: the engine's own watch does
        await eventually(pid_file.exists, timeout=10)
        child = int(pid_file.read_text())
        created = psutil.Process(child).create_time()
        assert os.getpgid(child) != engine.record.pgid  # it left the group
        await eventually(lambda: child in sink.last(), timeout=5)
        assert sink.last()[child] == pytest.approx(created, abs=0.01)
        assert {(pid, start) for pid, start, _ in sink.told} == {
            (engine.pid, engine.record.create_time)
        }
        await engine.kill()
        tg.cancel_scope.cancel()
    assert sink.told[-1][2] is None  # gone: its record goes too
    assert not _alive(child, created)  # killed with the engine


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return bool(
            abs(proc.create_time() - created) <= 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False
