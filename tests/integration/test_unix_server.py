"""The control listener's limits, with small bounds injected: a slow client is cut off, a
connection over the limit (none idle to make room) is closed at once, a large request is
refused, a streamed answer ends when its client leaves, and a kept-alive connection serves
one request after another."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from vllmd.control.api import refusal
from vllmd.control.listener import Reply, Request, Streamed, UnixServer, bind_unix

pytestmark = pytest.mark.anyio


class Recorder:
    """A handler that answers with who asked, or a stream it can tell was abandoned."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.stream_closed = anyio.Event()
        self.release = anyio.Event()  # ends the `/hold` requests

    async def __call__(self, request: Request) -> Reply | Streamed:
        self.requests.append(request)
        if request.segments == ("stream",):
            return Streamed(self._forever())
        if request.segments == ("hold",):
            await self.release.wait()
        body = f"{request.method} {'/'.join(request.segments)} {request.peer.uid}".encode()
        return Reply(200, body, "text/plain")

    async def _forever(self) -> AsyncIterator[bytes]:
        try:
            yield b"first\n"
            await anyio.sleep_forever()
        finally:
            self.stream_closed.set()


@asynccontextmanager
async def serving(tmp_path: Path, **limits: Any) -> AsyncIterator[tuple[Path, Recorder]]:
    path = tmp_path / "s.sock"
    handler = Recorder()
    server = UnixServer(handler, refusal, **limits)
    sock = bind_unix(path, 0o600)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, sock)
        yield path, handler
        tg.cancel_scope.cancel()


def _raw(path: Path, data: bytes, pause: float = 0.0, wait: float = 5.0) -> bytes:
    """Send `data` (pausing after its first bytes) and read the answer; b"" when the server
    cut the connection off without one."""
    try:
        return _exchange(path, data, pause, wait)
    except (BrokenPipeError, ConnectionResetError):
        return b""


def _exchange(path: Path, data: bytes, pause: float, wait: float) -> bytes:
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(wait)
        raw.connect(str(path))
        raw.sendall(data[:5])
        if pause:
            time.sleep(pause)
        raw.sendall(data[5:])
        chunks = []
        while chunk := raw.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in chunks[0]:
                break
        return b"".join(chunks)


async def test_keep_alive_serves_requests_one_after_another_with_the_peers_uid(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as (path, handler):
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            first = await http.get("/v1/a%2Fb/c?x=1")
            second = await http.post("/v1/d", content=b"body")
    assert first.text == f"GET v1/a/b/c {os.getuid()}"
    assert second.text.startswith("POST v1/d ")
    assert handler.requests[0].segments == ("v1", "a/b", "c")
    assert handler.requests[0].query == {"x": "1"}
    assert handler.requests[1].body == b"body"


async def test_a_client_slower_than_the_request_timeout_is_cut_off(tmp_path: Path) -> None:
    async with serving(tmp_path, request_timeout=0.3) as (path, handler):
        answer = await anyio.to_thread.run_sync(
            lambda: _raw(path, b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n", pause=1.0)
        )
    assert answer.startswith(b"HTTP/1.1 408") or answer == b""
    assert handler.requests == []


async def test_connections_over_the_limit_with_none_idle_are_closed_at_once(
    tmp_path: Path,
) -> None:
    """Both slots busy (answers under way) and nothing to take: one more connection is closed
    without an answer; once they are done the next one is served."""
    limits = {"max_connections": 3, "reserved": 1, "daemon_uid": os.getuid()}
    async with serving(tmp_path, **limits) as (path, handler):
        held = [socket.socket(socket.AF_UNIX) for _ in range(3)]
        try:
            for each in held:
                each.connect(str(path))
                each.sendall(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
            with anyio.fail_after(5):
                while len(handler.requests) < 3:  # noqa: ASYNC110 - the listener's doing
                    await anyio.sleep(0.02)
            extra = await anyio.to_thread.run_sync(
                lambda: _raw(path, b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
            )
        finally:
            handler.release.set()
            for each in held:
                each.close()
        await anyio.sleep(0.1)
        after = await anyio.to_thread.run_sync(
            lambda: _raw(path, b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
        )
    assert extra == b""  # cut off without an answer
    assert after.startswith(b"HTTP/1.1 200")


async def test_a_request_over_the_size_limit_is_413(tmp_path: Path) -> None:
    async with serving(tmp_path, max_request=1024) as (path, handler):
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            big_body = await http.post("/v1/x", content=b"x" * 2048)
        big_head = await anyio.to_thread.run_sync(
            lambda: _raw(
                path, b"GET /v1/x HTTP/1.1\r\nhost: x\r\nx-big: " + b"y" * 4096 + b"\r\n\r\n"
            )
        )
    assert big_body.status_code == 413 and big_body.json()["error"]["code"] == "body_too_large"
    assert big_head.startswith(b"HTTP/1.1 413")
    assert handler.requests == []


async def test_a_streamed_answer_ends_when_its_client_leaves(tmp_path: Path) -> None:
    async with serving(tmp_path) as (path, handler):
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://x") as http,
            http.stream("GET", "/stream") as stream,
        ):
            first = await anext(stream.aiter_lines())
        with anyio.fail_after(5):
            await handler.stream_closed.wait()
    assert first == "first"
