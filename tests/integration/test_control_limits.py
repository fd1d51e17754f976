"""The control listener's share of connections (issue 21 item 8), with real Unix-socket
clients: no uid takes every slot, root and the daemon's uid always find one, at the limit the
connection idle or stalled the longest makes room, and a stream nobody reads is cut off.

The listener tells a connection's uid from the abstract address its client bound
(`credentials`), so one test process can be several uids."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from itertools import count
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.integration.harness import eventually, fake_config, running
from vllmd.control.api import refusal
from vllmd.control.listener import Peer, Reply, Request, Streamed, UnixServer, bind_unix
from vllmd.control.slots import STALL_GRACE, Slot

pytestmark = pytest.mark.anyio
DAEMON_UID = 4242  # the listener's "daemon uid" here: not the test's own
_names = count()
STATUS = b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n"


def _credentials(sock: socket.socket) -> Peer:
    name = sock.getpeername()  # b"\0uid-<uid>-<n>": the address the test's client bound
    return Peer(pid=0, uid=int(name.split(b"-")[1]), gid=0)


class Handler:
    """`/hold` keeps its connection busy until released; `/stream` sends a line every few ms
    until its client leaves or is cut off; anything else answers at once."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.streams_closed = 0

    async def __call__(self, request: Request) -> Reply | Streamed:
        if request.segments == ("hold",):
            await self.release.wait()
        if request.segments == ("stream",):
            return Streamed(self._lines())
        return Reply(200, b"ok", "text/plain")

    async def _lines(self) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 200 + b"\n"
                await anyio.sleep(0.005)
        finally:
            self.streams_closed += 1


@asynccontextmanager
async def serving(tmp_path: Path, **limits: Any) -> AsyncIterator[tuple[UnixServer, Handler]]:
    handler = Handler()
    server = UnixServer(handler, refusal, daemon_uid=DAEMON_UID, credentials=_credentials, **limits)
    sock = bind_unix(tmp_path / "s.sock", 0o600)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, sock)
        try:
            yield server, handler
        finally:
            handler.release.set()
            tg.cancel_scope.cancel()


def _connect(path: Path, uid: int, request: bytes = b"") -> socket.socket:
    client = socket.socket(socket.AF_UNIX)
    try:
        client.bind(f"\0uid-{uid}-{os.getpid()}-{next(_names)}".encode())
        client.connect(str(path))  # blocking: with a timeout, a full backlog is EAGAIN
        client.settimeout(5)
        client.sendall(request)
    except OSError:
        client.close()
        raise
    return client


def _answer(path: Path, uid: int) -> bytes:
    """A prompt client's whole exchange: b"" when it was closed without an answer."""
    try:
        with _connect(path, uid, STATUS) as client:
            return client.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def _closed(client: socket.socket) -> bool:
    """Whether the listener closed `client` (read to the end, nothing pending)."""
    client.settimeout(0.5)
    try:
        while client.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def _holding(server: UnixServer, path: Path, uid: int, n: int) -> list[socket.socket]:
    """`n` busy connections of `uid` (their requests still being answered)."""
    held = [_connect(path, uid, b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n") for _ in range(n)]
    await eventually(lambda: sum(s.uid == uid and s.idle_since is None for s in _all(server)) == n)
    return held


def _all(server: UnixServer) -> list[Slot]:
    return list(server.slots)


def _close(clients: list[socket.socket]) -> None:
    for client in clients:
        client.close()


async def test_no_uid_takes_more_than_its_share(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=8, per_uid=3, reserved=2) as (server, _):
        path = tmp_path / "s.sock"
        held = await _holding(server, path, 1000, 3)
        over = await anyio.to_thread.run_sync(_answer, path, 1000)
        other = await anyio.to_thread.run_sync(_answer, path, 1001)
        _close(held)
    assert over == b""  # its share is busy: closed at once
    assert other.startswith(b"HTTP/1.1 200")


async def test_root_and_the_daemons_uid_always_find_a_slot(tmp_path: Path) -> None:
    """Unprivileged uids fill every shared slot with busy connections: another is closed at
    once, but root and the daemon's uid are answered (the two reserved slots)."""
    async with serving(tmp_path, max_connections=6, per_uid=2, reserved=2) as (server, _):
        path = tmp_path / "s.sock"
        held = await _holding(server, path, 1000, 2) + await _holding(server, path, 1001, 2)
        answers = {
            uid: await anyio.to_thread.run_sync(_answer, path, uid) for uid in (1002, 0, DAEMON_UID)
        }
        both = [_connect(path, uid, b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n") for uid in (0, 0)]
        await eventually(lambda: len(server.slots) == 6)
        full = await anyio.to_thread.run_sync(_answer, path, DAEMON_UID)
        _close(held + both)
    assert answers[1002] == b""
    assert answers[0].startswith(b"HTTP/1.1 200")
    assert answers[DAEMON_UID].startswith(b"HTTP/1.1 200")
    assert full == b""  # the reserved slots are two, both busy: nothing to take


async def test_at_the_limit_the_oldest_idle_connection_makes_room(tmp_path: Path) -> None:
    """Connections that never send a request do not starve a prompt client: it takes the
    slot of the one idle the longest, at once."""
    async with serving(tmp_path, max_connections=6, per_uid=3, reserved=2) as (server, _):
        path = tmp_path / "s.sock"
        idle = []
        for _ in range(3):
            idle.append(_connect(path, 1000))
            await eventually(lambda: len(server.slots) == len(idle))
        started = time.monotonic()
        answer = await anyio.to_thread.run_sync(_answer, path, 1000)
        took = time.monotonic() - started
        closed = [await anyio.to_thread.run_sync(_closed, each) for each in idle]
        _close(idle)
    assert answer.startswith(b"HTTP/1.1 200") and took < 1.0
    assert closed == [True, False, False]


async def test_at_the_limit_a_stalled_stream_makes_room_and_a_read_one_does_not(
    tmp_path: Path,
) -> None:
    limits = {"max_connections": 6, "per_uid": 2, "reserved": 2, "stall_grace": 0.5}
    async with serving(tmp_path, **limits):
        path = tmp_path / "s.sock"
        stalled = _connect(path, 1000, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        reader = _connect(path, 1000, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        read: list[int] = []
        stop = False

        def keep_reading() -> None:
            reader.settimeout(0.1)
            while not stop:
                with suppress(TimeoutError):
                    if not (chunk := reader.recv(65536)):
                        return
                    read.append(len(chunk))

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, keep_reading)
            await anyio.sleep(1.0)  # past the grace: the first has read nothing
            answer = await anyio.to_thread.run_sync(_answer, path, 1000)
            evicted = await anyio.to_thread.run_sync(_closed, stalled)
            reads_then = len(read)
            await anyio.sleep(0.2)
            still_reading = len(read) > reads_then
            stop = True
        _close([stalled, reader])
    assert answer.startswith(b"HTTP/1.1 200")
    assert evicted  # the stalled follower's slot was taken
    assert still_reading  # the follower that reads kept its stream


async def test_a_stream_its_client_does_not_read_is_cut_off(tmp_path: Path) -> None:
    async with serving(tmp_path, stall_timeout=0.5) as (_, handler):
        path = tmp_path / "s.sock"
        silent = _connect(path, 1000, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        with anyio.fail_after(5):
            while handler.streams_closed == 0:  # noqa: ASYNC110 - the listener's own doing
                await anyio.sleep(0.05)
        received = b""
        with suppress(OSError):
            silent.settimeout(1)
            while chunk := silent.recv(1 << 20):
                received += chunk
        silent.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert not received.endswith(b"0\r\n\r\n")  # cut off: not a clean end of the answer


# Against the daemon itself: every client is the daemon's uid (root, or the test's user).


async def test_silent_event_followers_do_not_lock_out_status(tmp_path: Path) -> None:
    """64 `events?follow=1` that never read took every slot: `vllmctl status` (and so
    systemd's ExecReload) failed while they stayed. Now the followers get the share of one
    uid, and once they have left their answer unread past the grace one makes room."""
    config = fake_config(tmp_path, {"a": {}})
    request = b"GET /v1/events?follow=1 HTTP/1.1\r\nhost: x\r\n\r\n"
    async with running(config) as run:
        path = run.control_socket
        followers = await anyio.to_thread.run_sync(_many, path, request, 64)
        await anyio.sleep(STALL_GRACE + 0.5)
        status = await anyio.to_thread.run_sync(_status, path)
        _close(followers)
    assert status.startswith(b"HTTP/1.1 200")


async def test_connections_that_never_send_do_not_starve_a_prompt_client(
    tmp_path: Path,
) -> None:
    """100 connections that never send a request: a prompt client is answered at once (it
    takes the slot of the one idle the longest), not after the others' request timeout."""
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        path = run.control_socket
        silent = await anyio.to_thread.run_sync(_many, path, b"", 100)
        started = time.monotonic()
        status = await anyio.to_thread.run_sync(_status, path)
        took = time.monotonic() - started
        _close(silent)
    assert status.startswith(b"HTTP/1.1 200") and took < 1.0


def _connect_as_is(path: Path, request: bytes) -> socket.socket:
    """A client with its own uid (SO_PEERCRED: the daemon's listener has no seam here)."""
    client = socket.socket(socket.AF_UNIX)
    try:
        client.connect(str(path))  # blocking: with a timeout, a full backlog is EAGAIN
        client.settimeout(5)
        client.sendall(request)
    except OSError:
        client.close()
        raise
    return client


def _many(path: Path, request: bytes, n: int) -> list[socket.socket]:
    """`n` clients that send `request` (if any) and read nothing; those the listener refused
    at once (a broken pipe as they send) are left out."""
    clients: list[socket.socket] = []
    try:
        for _ in range(n):
            with suppress(BrokenPipeError, ConnectionResetError):
                clients.append(_connect_as_is(path, request))
    except OSError:
        _close(clients)
        raise
    return clients


def _status(path: Path) -> bytes:
    try:
        with _connect_as_is(path, b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n") as client:
            return client.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""
