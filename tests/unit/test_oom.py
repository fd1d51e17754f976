"""An engine's SIGKILL is `oom` only where the kernel's OOM record names one of its processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import pytest

from vllmd.engine.kernel_log import Kmsg, oom_victims
from vllmd.engine.process import EngineProcess, spawn

pytestmark = pytest.mark.anyio
# An engine whose child (vLLM's Worker) is what the kernel would pick: it prints the child's pid.
PARENT_AND_CHILD = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


class FakeKernelLog:
    """Kernel log lines the test writes; read once each, like /dev/kmsg."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.closed = False

    def read(self) -> list[str]:
        lines, self.pending = self.pending, []
        return lines

    def close(self) -> None:
        self.closed = True


def _oom_line(pid: int) -> str:
    return (
        f"Out of memory: Killed process {pid} (python3) total-vm:2395884kB, anon-rss:1710232kB, "
        "file-rss:0kB, shmem-rss:0kB, UID:990 pgtables:4200kB oom_score_adj:500"
    )


async def _spawn(
    kernel_log: FakeKernelLog, code: str = "import time; time.sleep(60)"
) -> EngineProcess:
    return await spawn(
        [sys.executable, "-c", code], dict(os.environ), kernel_log=lambda: kernel_log
    )


def test_oom_victims_are_read_from_every_kind_of_kill_record() -> None:
    lines = [
        _oom_line(101),
        "Memory cgroup out of memory: Killed process 102 (VLLM::Worker) total-vm:1kB",
        "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,"
        "global_oom,task_memcg=/system.slice/vllmd.service,task=python3,pid=103,uid=990",
        "oom_reaper: reaped process 101 (python3), now anon-rss:0kB, file-rss:0kB",
        "python3 invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE), order=0, "
        "oom_score_adj=500",
        "[   104]   990   104   599471   427558  3506176        0           500 python3",
        'audit: type=1400 pid=105 comm="x"',
    ]
    assert oom_victims(lines) == {101, 102, 103}


async def test_sigkill_the_kernel_attributes_to_the_engine_is_oom() -> None:
    log = FakeKernelLog()
    proc = await _spawn(log)
    log.pending.append(_oom_line(proc.pid))
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert await proc.killed_by_oom()
    await proc.kill()
    assert log.closed


async def test_another_process_killed_by_the_oom_killer_is_not_this_engines_oom() -> None:
    """Regression: a cgroup-wide `oom_kill` counter made any OOM kill in the unit during an
    engine's life (another engine's, any process's) this engine's, if it died of SIGKILL."""
    log = FakeKernelLog()
    proc = await _spawn(log)
    log.pending.append(_oom_line(proc.pid + 100_000))
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert not await proc.killed_by_oom()
    await proc.kill()


async def test_oom_kill_of_a_known_descendant_is_the_engines_oom() -> None:
    """The kernel picks the biggest process, vLLM's Worker, not the API server."""
    log = FakeKernelLog()
    proc = await _spawn(log, PARENT_AND_CHILD)
    child = 0
    async for line in proc.lines():
        child = int(line)
        break
    await proc.remember_descendants()
    assert child in proc.descendants
    os.kill(child, signal.SIGKILL)
    log.pending.append(_oom_line(child))
    os.killpg(proc.record.pgid, signal.SIGKILL)
    await proc.kill()  # the record is read on the way out, too
    assert await proc.killed_by_oom()


async def test_without_a_readable_kernel_log_a_sigkill_is_not_oom(tmp_path: Path) -> None:
    proc = await spawn(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        dict(os.environ),
        kernel_log=lambda: Kmsg(str(tmp_path / "no-kmsg")),
    )
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert not await proc.killed_by_oom()
    await proc.kill()


async def test_kmsg_reads_only_what_comes_after_it_was_opened() -> None:
    """The boot messages are in the kernel's buffer; a reader opened now must not see them
    (an OOM kill from before the engine's spawn is not the engine's)."""
    kmsg = await anyio.to_thread.run_sync(Kmsg)
    try:
        messages = await anyio.to_thread.run_sync(kmsg.read)
    finally:
        kmsg.close()
    assert not any(m.startswith("Linux version") for m in messages)
