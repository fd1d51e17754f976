"""The liveness check's sense of progress (vllmd.engine.progress): reads on an engine's
connections, or CPU time its processes use; a stopped process shows none."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import anyio
import psutil
import pytest

from vllmd.engine.progress import Progress, cpu_seconds

pytestmark = pytest.mark.anyio


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[bytes]]:
    """A process that computes (a core's worth of CPU) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


def _known(proc: subprocess.Popen[bytes]) -> dict[int, float]:
    return {proc.pid: psutil.Process(proc.pid).create_time()}


async def test_reads_are_progress_and_none_are_not() -> None:
    reads = [0]
    progress = Progress(lambda: reads[0], dict)
    assert not await progress.sample()  # nothing to compare with yet
    reads[0] += 1
    assert await progress.sample()
    await anyio.sleep(0.05)
    assert not await progress.sample()


async def test_cpu_time_is_progress_until_the_process_is_stopped(
    spinner: subprocess.Popen[bytes],
) -> None:
    pids = _known(spinner)
    progress = Progress(lambda: 0, lambda: pids)
    await progress.sample()
    await anyio.sleep(0.5)
    assert await progress.sample()  # computing: no byte moved, CPU did
    spinner.send_signal(signal.SIGSTOP)
    await anyio.sleep(0.1)  # (a tick it was still running in)
    await progress.sample()
    await anyio.sleep(0.5)
    assert not await progress.sample()  # wedged: neither


def test_a_pid_reused_by_another_process_is_not_counted(
    spinner: subprocess.Popen[bytes],
) -> None:
    created = psutil.Process(spinner.pid).create_time()
    assert set(cpu_seconds({spinner.pid: created})) == {spinner.pid}
    assert cpu_seconds({spinner.pid: created - 5}) == {}
    assert cpu_seconds({2**22 + 1: 0.0}) == {}  # (above the kernel's pid_max: none such)
