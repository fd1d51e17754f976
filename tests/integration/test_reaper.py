"""The daemon reaps its dead engine processes, and nothing else (docs/design.md "Supervision").

The daemon runs inside the test process here, so the test process is the child subreaper:
engine orphans re-parent to it, and so would a greedy reaper take the tests' own children.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import psutil
import pytest

from tests.integration.harness import client, eventually, fake_config, running
from vllmd.engine.reaper import Reaper, become_subreaper
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
ORPHANING_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "orphaning_engine.py"
# The parent of an orphan lives until the orphan has exited: a sleeping child, then exit 0.
FORK_AND_EXIT = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    time.sleep(float(sys.argv[1])); os._exit(0)\n"
    "os._exit(3)\n"
)


def _pids(path: Path) -> dict[str, int]:
    lines = path.read_text().splitlines()
    return {role: int(pid) for pid, role in (line.split() for line in lines)}


def _child(argv: list[str], new_session: bool = False) -> subprocess.Popen[bytes]:
    """A child of the test process, owned (and waited for) by the test, not the daemon."""
    return subprocess.Popen(argv, start_new_session=new_session)


def _zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _zombie_children(pgid: int) -> list[int]:
    found = []
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE and os.getpgid(child.pid) == pgid:
                found.append(child.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


async def test_engine_process_that_dies_after_the_engine_stopped_is_reaped(
    tmp_path: Path,
) -> None:
    """Regression: vLLM's Worker re-parents to the daemon after its EngineCore exits; after
    two evictions two `[VLLM::Worker] <defunct>` stayed until the daemon stopped, because only
    pids the daemon knew were reaped, and only while it stopped the engine."""
    pids_file, release = tmp_path / "pids", tmp_path / "release"
    env = {"ORPHAN_PIDS_FILE": str(pids_file), "ORPHAN_RELEASE_FILE": str(release)}
    config = fake_config(
        tmp_path,
        {"m": {"env": env}},
        engine={"command": [sys.executable, str(ORPHANING_ENGINE)]},
    )
    async with running(config, reaper=Reaper()) as run, client(run) as http:
        assert (await http.post("/v1/completions", json={"model": "m", "prompt": "x"})).is_success
        instance = run.supervisor.instances["m"]
        engine_group = instance.pgid()
        assert engine_group is not None
        pids = _pids(pids_file)
        zombie, lingerer = pids["zombie"], pids["lingerer"]
        assert _zombie(zombie) and os.getpgid(zombie) == engine_group
        assert psutil.Process(lingerer).ppid() == os.getpid()  # handed to the subreaper

        await run.supervisor.unload(instance)
        assert instance.state is InstanceState.STOPPED
        assert psutil.Process(lingerer).status() != psutil.STATUS_ZOMBIE  # it outlived it
        assert _zombie(zombie)
        release.touch()
        # The lingerer left every engine group: its exit status is still there for its owner
        # (here, this test); its exit hands its dead child to the daemon.
        got, status = await anyio.to_thread.run_sync(os.waitpid, lingerer, 0)
        assert (got, os.waitstatus_to_exitcode(status)) == (lingerer, 0)

        await eventually(lambda: not psutil.pid_exists(zombie), timeout=5)
        assert not _zombie_children(engine_group)


async def test_reaper_takes_dead_members_of_adopted_groups_only(tmp_path: Path) -> None:
    """Reaped: a dead engine-group member that re-parented to the daemon. Left alone: the
    engine's leader (its status belongs to whoever awaits it) and every other child, in
    the daemon's group or in a session of its own."""
    assert become_subreaper()
    leader = _child([sys.executable, "-c", FORK_AND_EXIT, "0.3"], new_session=True)
    same_group = _child(["sh", "-c", "exit 7"])
    own_session = _child(["sh", "-c", "exit 9"], new_session=True)
    reaper = Reaper()
    reaper.adopt(leader.pid, leader=leader.pid)
    await eventually(lambda: _zombie(leader.pid) and _zombie(same_group.pid))
    await eventually(lambda: _zombie(own_session.pid))

    # The leader's child re-parents to this process and dies there.
    def orphans() -> list[int]:
        return [pid for pid in _zombie_children(leader.pid) if pid != leader.pid]

    await eventually(lambda: len(orphans()) == 1)

    dead = orphans()
    assert await reaper.reap() == dead
    assert not orphans()
    assert await reaper.reap() == []
    assert leader.wait(timeout=5) == 3
    assert same_group.wait(timeout=5) == 7
    assert own_session.wait(timeout=5) == 9
    await reaper.reap()
    assert leader.pid not in reaper.groups  # the group is gone: forgotten


async def test_children_of_the_daemon_process_that_are_no_engines_are_left_alone(
    tmp_path: Path,
) -> None:
    """While engines run the reaper looks, yet a test's own subprocess keeps its status."""
    reaper = Reaper()
    config = fake_config(tmp_path, {"m": {"env": {"FAKE_SPAWN_CHILDREN": "1"}}})
    async with running(config, reaper=reaper) as run, client(run) as http:
        assert (await http.post("/v1/completions", json={"model": "m", "prompt": "x"})).is_success
        instance = run.supervisor.instances["m"]
        pgid = instance.pgid()
        assert pgid is not None and pgid in reaper.groups
        foreign = _child(["sh", "-c", "exit 7"])
        await eventually(lambda: _zombie(foreign.pid))
        assert foreign.pid not in await reaper.reap()
        await anyio.sleep(3 * reaper.interval)  # and its own rounds saw it too
        assert foreign.wait(timeout=5) == 7
