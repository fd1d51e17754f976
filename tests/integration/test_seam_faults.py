"""Faults at the daemon's seams, with the real parts where they can be had (issue 22): its state
dir on a real file system that is full or read-only (a small tmpfs: ENOSPC, EROFS), an NVML
call that hangs (the fake pynvml module, behind the real NVML probe), and the engine's socket
directory removed under a running engine. Serving goes on through each; the store is degraded
and catches up; the device goes down while the event loop and the watchdog live; the engine
is restarted on a new socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import anyio
import httpx
import pytest

from tests.fakes.fake_pynvml import FakeGpu, FakeNvml
from tests.integration.harness import chat, client, control, eventually, fake_config, running
from vllmd.daemon import Running
from vllmd.devices.nvml import NvmlProbe
from vllmd.events import Kind
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
UUID0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"


@contextmanager
def _tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` at `path` (root, as the suite runs here: a failure is a failure)."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def _fill(path: Path) -> None:
    """Write `path` until its file system is full."""
    with path.open("wb") as f:
        block = b"\0" * 65536
        with suppress(OSError):
            while True:
                f.write(block)
                f.flush()


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Wait for what the daemon reports over HTTP."""
    with anyio.fail_after(timeout):
        while not await condition():  # noqa: ASYNC110 - asked over HTTP, no event to await
            await anyio.sleep(0.1)


async def _degraded(http: httpx.AsyncClient) -> bool:
    text = (await http.get("/metrics")).text
    (line,) = [x for x in text.splitlines() if x.startswith("vllmd_state_store_degraded ")]
    return float(line.split()[1]) == 1.0


async def _toggle(run: Running, times: int) -> None:
    """Unload and load the model `times` times: state events for the store to write."""
    async with control(run) as ctl:
        for _ in range(times):
            assert (await ctl.post("/v1/models/m/unload")).status_code == 200
            assert (await ctl.post("/v1/models/m/load")).status_code == 200


def _stored_ids(db: Path) -> set[int]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM events")}


async def test_a_full_state_dir_degrades_the_store_serving_goes_on_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    with _tmpfs(tmp_path / "state", "2m") as state:
        config = fake_config(tmp_path, {"m": {}}, daemon={"state_dir": str(state)})
        async with running(config) as run, client(run) as http:
            assert (await http.post("/v1/completions", json=chat("m"))).status_code == 200
            await eventually(lambda: (state / "vllmd.db").exists())
            assert not await _degraded(http)
            _fill(state / "filler")
            first = len(run.events.history)
            await _toggle(run, 3)
            await _until(lambda: _degraded(http), timeout=15)
            answer = await http.post("/v1/completions", json=chat("m"))
            assert answer.status_code == 200  # serving goes on, degraded
            during = {e.id for e in list(run.events.history)[first:]}
            (state / "filler").unlink()  # room again: the store catches up
        stored = _stored_ids(state / "vllmd.db")
    assert during and during <= stored


async def test_a_read_only_state_dir_degrades_the_store_and_serving_goes_on(
    tmp_path: Path,
) -> None:
    with _tmpfs(tmp_path / "state", "8m", read_only=True) as state:
        config = fake_config(tmp_path, {"m": {}}, daemon={"state_dir": str(state)})
        async with running(config) as run, client(run) as http:
            assert (await http.post("/v1/completions", json=chat("m"))).status_code == 200
            await _toggle(run, 1)
            assert await _degraded(http)
            assert not (state / "vllmd.db").exists()
            _remount(state, "rw")  # the operator fixes it: the next writes go through
            await _toggle(run, 1)
            await eventually(lambda: (state / "vllmd.db").exists(), timeout=15)
            last = run.events.history[-1].id
        stored = _stored_ids(state / "vllmd.db")
    assert last in stored


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def _pings(sock: socket.socket) -> int:
    count = 0
    with suppress(BlockingIOError):
        while True:
            count += sock.recv(65536) == b"WATCHDOG=1"
    return count


async def test_an_nvml_call_that_hangs_takes_the_gpu_down_while_the_daemon_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real NVML probe over a fake pynvml whose memory reads block: the GPU is reported
    down within the probe's timeout, the gateway answers at once meanwhile, the watchdog is
    still fed (the loop runs on time), and the GPU comes back when the call returns."""
    sock = _notify_socket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    gpu = FakeGpu(UUID0)
    probe = NvmlProbe(FakeNvml([gpu]), timeout=0.5)
    config = fake_config(tmp_path, {"m": {"devices": ["0"], "memory": "8GiB"}}, devices={})

    async def up(ctl: httpx.AsyncClient) -> bool:
        devices = (await ctl.get("/v1/status")).json()["devices"]
        return bool(next(d for d in devices if d["name"] == "0")["up"])

    try:
        async with running(config, probe=probe) as run, client(run) as http, control(run) as ctl:
            assert await up(ctl)
            gpu.hang = threading.Event()
            _pings(sock)
            slowest = 0.0
            started = time.monotonic()
            with anyio.fail_after(15):
                while await up(ctl):
                    began = time.monotonic()
                    assert (await http.get("/health")).status_code == 200
                    slowest = max(slowest, time.monotonic() - began)
                    await anyio.sleep(0.1)
            await anyio.sleep(1.5)  # hung still: the watchdog keeps coming
            pings = _pings(sock)
            hung_for = time.monotonic() - started
            gpu.hang.set()
            await _until(lambda: up(ctl), timeout=15)
    finally:
        if gpu.hang is not None:
            gpu.hang.set()
        sock.close()
    assert slowest < 0.25  # the loop never waited for NVML
    assert pings >= hung_for - 2, (pings, hung_for)


async def test_an_engines_socket_directory_removed_under_it_gets_the_engine_restarted(
    tmp_path: Path,
) -> None:
    """Its socket gone, the engine cannot be reached: the health checks fail, it is
    restarted (reason unhealthy) on a new socket, and requests are answered again."""
    argv_file = tmp_path / "argv.jsonl"
    config = fake_config(tmp_path, {"m": {"env": {"FAKE_ARGV_FILE": str(argv_file)}}})
    async with running(config) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=chat("m"))).status_code == 200
        argv = json.loads(argv_file.read_text().splitlines()[0])
        uds = Path(argv[argv.index("--uds") + 1])
        shutil.rmtree(uds.parent)
        m = run.supervisor.get("m")
        await eventually(lambda: len(argv_file.read_text().splitlines()) == 2, timeout=20)
        with anyio.fail_after(20):
            await m.wait_state(InstanceState.READY)
        answer = await http.post("/v1/completions", json=chat("m"))
        restarts = [e for e in run.events.history if e.kind is Kind.STATE and e.model == "m"]
    assert answer.status_code == 200, answer.text
    assert any(e.fields.get("reason") == "unhealthy" for e in restarts), restarts
