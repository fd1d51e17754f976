"""Crash recovery of an engine killed with the daemon in its first second (real `vllmd serve`
processes, the fake engine): before the daemon first notes an engine's processes (TREE_NOTE), a
child that left the engine's group is in no record, and the engine's own `spawned` record may
not be written yet. The next daemon finds them by the marker they inherited, which names the
daemon's run, listed in the state database before any engine was spawned."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.integration.harness import fake_model, write_fake_config
from tests.integration.test_cli import _free_port
from tests.integration.test_daemon_restart import VLLMCTL, Daemon
from tests.integration.test_recovery_escaped import _alive, _recorded
from vllmd.engine.process import MARKER_ENV


def _config(tmp_path: Path, port: int) -> Path:
    env = (
        f'env = {{ FAKE_SPAWN_CHILDREN = "1", FAKE_PIDS_FILE = "{tmp_path / "pids"}", '
        'FAKE_STARTUP_DELAY = "60" }'
    )
    return write_fake_config(
        tmp_path / "vllmd.toml",
        fake_model("m", env, cpus=None),
        engine='drain_timeout = "1s"',
        listen=f"127.0.0.1:{port}",
        cpu_memory="16GiB",
    )


def _pids(path: Path) -> dict[str, int]:
    """The fake engine's children: "in-group" and "escaped" -> pid."""
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.01)
    lines = path.read_text().splitlines()
    return {role: int(pid) for pid, role in (line.split() for line in lines)}


def test_an_escaped_child_of_an_engine_killed_in_its_first_second_is_killed_at_the_restart(
    tmp_path: Path,
) -> None:
    """Regression: descendants are first recorded TREE_NOTE after the spawn, and recovery
    killed only the recorded group and the recorded descendants, so a child in a session of
    its own outlived a daemon killed before then, and its restart."""
    port = _free_port()
    config, log = _config(tmp_path, port), tmp_path / "daemon.log"
    first = Daemon(config, port, log)
    load = subprocess.Popen(
        [*VLLMCTL, "--socket", str(first.socket), "load", "m"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids: dict[str, int] = {}
    created: dict[int, float] = {}
    try:
        pids = _pids(tmp_path / "pids")
        first.process.send_signal(signal.SIGKILL)  # well within the engine's first second
        first.process.wait(10)
        leader = psutil.Process(pids["in-group"]).parent()
        assert leader is not None
        pids["leader"] = leader.pid
        created = {pid: psutil.Process(pid).create_time() for pid in pids.values()}
        escaped = pids["escaped"]
        assert psutil.Process(escaped).environ().get(MARKER_ENV)  # inherited
        assert not _recorded(tmp_path / "state" / "vllmd.db", escaped)  # (what was missed)
        time.sleep(0.5)
        assert all(_alive(p, created[p]) for p in pids.values()), "all outlive the daemon"

        second = Daemon(config, port, log)  # answers once recovery is done
        try:
            alive = [role for role, pid in pids.items() if _alive(pid, created[pid])]
            assert alive == [], f"survived the restart: {alive}"
            killed = [e for e in second.entries() if e.get("event") == "orphans_killed"]
            assert escaped in {p for e in killed for p in e["pids"]}
            assert all(e["survivors"] == [] for e in killed)
        finally:
            second.process.send_signal(signal.SIGTERM)
            assert second.process.wait(30) == 0
    finally:
        load.kill()
        load.wait()
        first.process.kill()
        for pid in pids.values():
            if _alive(pid, created.get(pid)):
                psutil.Process(pid).kill()
