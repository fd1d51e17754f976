"""systemd's notify protocol as systemd sees it: a SOCK_DGRAM socket in NOTIFY_SOCKET gets
READY=1 (once the gateway and control sockets are bound) with a STATUS line that counts models
and reserved memory, STATUS= on transitions, WATCHDOG=1 every WATCHDOG_USEC/2 while the
daemon is healthy, and STOPPING=1 on the way out."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import anyio
import pytest

from tests.integration.harness import client, fake_config, running

pytestmark = pytest.mark.anyio


def _drain(sock: socket.socket) -> list[tuple[float, str]]:
    """The datagrams waiting now (with the time they were read)."""
    out: list[tuple[float, str]] = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return out
        out.append((time.monotonic(), data.decode()))


async def test_ready_status_watchdog_and_stopping_datagrams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    config = fake_config(tmp_path, {"a": {}, "b": {}})
    try:
        async with running(config) as run, client(run) as http:
            control_bound = run.control_socket.exists()
            early = _drain(sock)
            body = {"model": "a", "prompt": "x", "max_tokens": 1}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            await anyio.sleep(3.2)
            middle = _drain(sock)
        final = _drain(sock)
    finally:
        sock.close()
    ready = [m for _, m in early if "READY=1" in m]
    assert control_bound and ready, early
    assert "STATUS=2 models: 2 stopped; 0.0/64.0 GiB reserved" in ready[0].split("\n")
    statuses = [m for _, m in middle if m.startswith("STATUS=")]
    assert "STATUS=2 models: 1 ready, 1 stopped; 3.0/64.0 GiB reserved" in statuses
    # About one a second over the ~3.5 s the daemon ran: the cadence, not a burst.
    pings = [m for _, m in early + middle if m == "WATCHDOG=1"]
    assert 3 <= len(pings) <= 6, middle
    assert any("STOPPING=1" in m for _, m in final), final


async def test_a_blocked_event_loop_withholds_the_watchdog_ping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overdue ping after the loop was blocked for longer than WATCHDOG_USEC/4 is not
    sent (an ungated watchdog would send it at once); the next one, a second later, is."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        async with running(fake_config(tmp_path, {"a": {}})):
            await anyio.sleep(1.5)
            _drain(sock)
            time.sleep(2.0)
            await anyio.sleep(0.7)
            after_block = [m for _, m in _drain(sock) if m == "WATCHDOG=1"]
            await anyio.sleep(1.2)
            later = [m for _, m in _drain(sock) if m == "WATCHDOG=1"]
    finally:
        sock.close()
    assert after_block == []
    assert later == ["WATCHDOG=1"]
