"""Crash recovery of an engine's process that left its process group (issue 21, item 7): the
daemon records the engine's processes as it sees them, and after `kill -9` the next daemon kills
those by pid and start time, beside the recorded groups; nothing else is touched, a reused pid
least of all."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from tests.integration.test_cli import _free_port
from tests.integration.test_daemon_restart import Daemon
from tests.integration.test_recovery import FakeGpuless
from vllmd.engine.process import boot_id
from vllmd.events import EventBus, Kind
from vllmd.store import EngineRecord, recover

ESCAPING_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "escaping_engine.py"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "vllmd.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "state"
control_socket = "ctl.sock"
[gateway]
listen = "127.0.0.1:{port}"
[engine]
command = ["{sys.executable}", "{ESCAPING_ENGINE}"]
model_flag = "--model"
stop_timeout = "3s"
drain_timeout = "1s"
[devices.cpu0]
kind = "cpu"
memory = "16GiB"
[models.m]
model = "fake/m"
devices = ["cpu0"]
memory = "3GiB"
env = {{ ESCAPED_PID_FILE = "{tmp_path / "escaped.pid"}" }}
"""
    )
    return path


def _alive(pid: int, created: float | None = None) -> bool:
    try:
        proc = psutil.Process(pid)
        same = created is None or abs(proc.create_time() - created) <= 0.01
        return bool(same and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _recorded(db: Path, pid: int) -> bool:
    """Whether the state database's engine record of m lists `pid` among its processes."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT descendants FROM engines WHERE model = 'm'").fetchone()
    except sqlite3.Error:
        return False
    return row is not None and str(pid) in json.loads(row[0])


def _read_pid(path: Path, not_: int = 0, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and int(path.read_text()) != not_:
            return int(path.read_text())
        time.sleep(0.05)
    pytest.fail(f"{path} never written")


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process of another program, started while the engine runs: never to be killed."""
    with subprocess.Popen(SLEEPER, start_new_session=True) as proc:
        yield proc
        proc.kill()


def test_after_kill_9_an_engine_child_that_left_its_group_is_killed_at_the_restart(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    """Regression: recovery matched only members of the recorded group, so a child of the
    engine in a session of its own (no marker either) outlived the daemon and its restart."""
    port = _free_port()
    config, log = _config(tmp_path, port), tmp_path / "daemon.log"
    pid_file = tmp_path / "escaped.pid"
    first = Daemon(config, port, log)
    escaped = second_escaped = 0
    try:
        assert first.ctl("load", "m").returncode == 0
        escaped = _read_pid(pid_file)
        created = psutil.Process(escaped).create_time()
        deadline = time.monotonic() + 10
        while not _recorded(tmp_path / "state" / "vllmd.db", escaped):
            if time.monotonic() > deadline:
                break  # (today's daemon never records it: the restart shows what that costs)
            time.sleep(0.05)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        time.sleep(0.5)
        assert _alive(escaped, created), "the escaped child should have outlived the daemon"

        second = Daemon(config, port, log)  # answers once recovery is done
        try:
            assert not _alive(escaped, created), "the escaped child survived the restart"
            assert bystander.poll() is None  # another program's process: untouched
            killed = next(e for e in second.entries() if e.get("event") == "orphans_killed")
            assert escaped in killed["pids"] and killed["survivors"] == []
            second._wait(lambda: second.model("m")["state"] == "ready", "never reloaded m")
            second_escaped = _read_pid(pid_file, not_=escaped)
            assert _alive(second_escaped)  # the new engine's: untouched
        finally:
            second.process.send_signal(signal.SIGTERM)
            assert second.process.wait(30) == 0
        assert not _alive(second_escaped), "a clean stop kills the escaped child too"
    finally:
        first.process.kill()
        for pid in (escaped, second_escaped):
            if pid and _alive(pid):
                psutil.Process(pid).kill()


def test_a_recorded_process_is_killed_by_pid_and_start_time_and_a_reused_pid_never_is() -> None:
    """Recovery against a record (its leader and group long gone) that lists two processes: one
    alive with its recorded start time (killed), one whose pid now names a process started
    later (another program's: left alone)."""
    with (
        subprocess.Popen(SLEEPER, start_new_session=True) as escaped,
        subprocess.Popen(SLEEPER, start_new_session=True) as reused,
    ):
        try:
            with subprocess.Popen(["true"]) as leader:  # the engine's leader: gone (and reaped)
                assert leader.wait(5) == 0
            started = psutil.Process(escaped.pid).create_time()
            record = EngineRecord(
                "m",
                pid=leader.pid,
                pgid=leader.pid,
                start_time=started - 5,
                boot_id=boot_id(),
                descendants=(
                    (escaped.pid, started),
                    (reused.pid, psutil.Process(reused.pid).create_time() - 3),
                ),
            )
            bus = EventBus()
            assert anyio.run(recover, [record], FakeGpuless(), bus) == {"m"}
            assert escaped.wait(5) == -signal.SIGKILL
            assert reused.poll() is None
            [told] = bus.history
            assert told.kind is Kind.ORPHANS_KILLED
            assert dict(told.fields) == {"pids": [escaped.pid], "pgid": leader.pid, "survivors": []}
        finally:
            for proc in (escaped, reused):
                proc.kill()
