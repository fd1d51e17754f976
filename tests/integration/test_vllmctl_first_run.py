"""What a new user's first `vllmctl` calls found with `make run`'s daemon up: `doctor --config
FILE` asked the default socket (and so FAILed the gateway port the daemon holds), and `ps`
showed a stopped model's last footprint as USED."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from tests.integration.harness import fake_config, running
from tests.integration.test_vllmctl import _config_file, line, row, vllmctl
from vllmd.config import load_config

pytestmark = pytest.mark.anyio


HOLD = (
    "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
    "print(s.getsockname()[1], flush=True); time.sleep(60)"
)


@contextmanager
def held_elsewhere() -> Iterator[subprocess.Popen[str]]:
    """A process holding a port on loopback (the daemon runs in this one); it prints the port."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            yield holder
        finally:
            holder.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_doctor_with_config_asks_that_files_socket_and_passes_the_port_vllmd_holds(
    tmp_path: Path,
) -> None:
    """The daemon listens on the file's `daemon.control_socket`, not /run/vllmd/control.sock."""
    port = free_port()
    config = _config_file(tmp_path, listen=f"127.0.0.1:{port}")
    async with running(load_config(config)) as run:
        assert run.control_socket == tmp_path / "ctl.sock"
        result = await vllmctl(None, "doctor", "--config", str(config))
    assert result.rc == 0, result.out
    assert line(result, "PASS", "daemon").endswith(f"pid {os.getpid()}, on {tmp_path}/ctl.sock")
    line(result, "PASS", "control socket")
    assert line(result, "PASS", "gateway port") == (
        f"PASS  gateway port: 127.0.0.1:{port} held by the running vllmd, pid {os.getpid()}"
    )


async def test_doctor_socket_flag_and_environment_still_win_over_the_configs(
    tmp_path: Path,
) -> None:
    config = _config_file(tmp_path)
    nowhere = str(tmp_path / "nowhere.sock")
    async with running(load_config(config)):
        flagged = await vllmctl(Path(nowhere), "doctor", "--config", str(config))
        named = await vllmctl(
            None, "doctor", "--config", str(config), env={"VLLMD_SOCKET": nowhere}
        )
    for result in (flagged, named):
        assert f"cannot reach vllmd at {nowhere}" in line(result, "WARN", "daemon")


async def test_doctor_with_the_daemon_up_fails_a_port_another_process_holds(
    tmp_path: Path,
) -> None:
    """A new file's gateway port held by someone else is no PASS because vllmd is up."""
    other = tmp_path / "next"
    other.mkdir()
    with held_elsewhere() as holder:
        port = int(holder.stdout.readline()) if holder.stdout else 0
        new = _config_file(other, listen=f"127.0.0.1:{port}")
        # A new version of the running daemon's file: the same socket.
        new.write_text(new.read_text().replace(str(other), str(tmp_path)))
        async with running(load_config(_config_file(tmp_path))):
            taken = await vllmctl(None, "doctor", "--config", str(new))
            holder.kill()
            await anyio.to_thread.run_sync(holder.wait)
            free = await vllmctl(None, "doctor", "--config", str(new))
    line(taken, "PASS", "daemon")
    assert taken.rc == 1, taken.out
    assert f"127.0.0.1:{port}" in line(taken, "FAIL", "gateway port")
    assert line(free, "PASS", "gateway port").endswith(f"127.0.0.1:{port} is free")


async def test_ps_used_is_a_dash_once_a_model_is_stopped(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        assert (await vllmctl(run.control_socket, "load", "a")).rc == 0
        assert row(await vllmctl(run.control_socket, "ps"), "a")[4].endswith("iB")
        assert (await vllmctl(run.control_socket, "unload", "a")).rc == 0
        cells = row(await vllmctl(run.control_socket, "ps"), "a")
    assert cells[1] == "stopped"
    assert cells[4] == "-", cells


async def test_events_show_an_evictions_bytes_per_device_as_sizes(tmp_path: Path) -> None:
    """`frees_bytes="{'cpu0': 3221225472}"` was the map's Python repr."""
    config = fake_config(
        tmp_path,
        {"a": {}, "b": {}},
        devices={"cpu0": {"kind": "cpu", "memory": "5GiB"}},
        scheduler={"headroom": "0", "min_residency": "0s"},
    )
    async with running(config) as run:
        assert (await vllmctl(run.control_socket, "load", "a")).rc == 0
        assert (await vllmctl(run.control_socket, "load", "b")).rc == 0
        events = await vllmctl(run.control_socket, "events")
    evicting = [text for text in events.lines if " evicting a " in text]
    assert evicting, events.out
    assert " frees_bytes=cpu0=3.0GiB" in evicting[0], evicting[0]
    assert "{" not in events.out and "'" not in events.out
