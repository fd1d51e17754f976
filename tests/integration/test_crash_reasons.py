"""Why an engine died, as the daemon tells it: `oom` only where the kernel's OOM record names
one of the engine's processes, else `crash` (docs/design.md "Supervision")."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.harness import client, eventually, fake_config, running
from vllmd.daemon import Running
from vllmd.events import Event

pytestmark = pytest.mark.anyio


class FakeKernel:
    """The kernel's log as the test writes it; each reader sees what came after its opening."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def open(self) -> FakeKernel.Reader:
        return FakeKernel.Reader(self)

    class Reader:
        def __init__(self, kernel: FakeKernel) -> None:
            self.kernel, self.at = kernel, len(kernel.lines)

        def read(self) -> list[str]:
            new = self.kernel.lines[self.at :]
            self.at += len(new)
            return new

        def close(self) -> None:
            pass


def _crashes(run: Running) -> list[Event]:
    return [e for e in run.events.history if e.kind == "crashed"]


async def _killed(tmp_path: Path, kernel_says: str) -> Event:
    """Start the model, let the kernel's log say `kernel_says` (with {pid}), SIGKILL it."""
    kernel = FakeKernel()
    async with (
        running(fake_config(tmp_path, {"m": {}}), kernel_log=kernel.open) as run,
        client(run) as http,
    ):
        assert (await http.post("/v1/completions", json={"model": "m", "prompt": "x"})).is_success
        pgid = run.supervisor.instances["m"].pgid()  # the engine's leader is its group's
        assert pgid is not None
        kernel.lines.append(kernel_says.format(pid=pgid))
        os.killpg(pgid, signal.SIGKILL)
        await eventually(lambda: bool(_crashes(run)), timeout=10)
        return _crashes(run)[0]


async def test_sigkill_the_kernel_says_was_an_oom_kill_is_oom(tmp_path: Path) -> None:
    crash = await _killed(tmp_path, "Out of memory: Killed process {pid} (python3) UID:0")
    assert crash.fields["reason"] == "oom"


async def test_sigkill_while_another_process_was_oom_killed_is_a_crash(tmp_path: Path) -> None:
    """Regression: any OOM kill in the daemon's cgroup during the engine's life made the
    engine's SIGKILL an `oom`."""
    crash = await _killed(tmp_path, "Out of memory: Killed process 1{pid} (other) UID:0")
    assert crash.fields["reason"] == "crash"
