"""Request bodies at vllmd's HTTP server (issue 21): a request that asks for an upgrade is served
as plain HTTP/1.1 with its body (then the connection closes), an answer given before its
request's body is all in closes the connection at once (a lingering close), and receive()
with a timeout gives up on a body that stalls between reads."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import cast

import anyio
import pytest

from tests.integration.test_http_server import App, _connection, _exchange, _start, serving
from vllmd.httpserver.asgi import Receive, ReceiveWithin, Scope, Send
from vllmd.httpserver.closing import LINGER
from vllmd.httpserver.exchange import RECEIVE_TIMEOUT

pytestmark = pytest.mark.anyio

# What `curl --http2` sends to an http:// URL, and a websocket handshake's request.
UPGRADES = {
    "h2c": b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    "websocket": b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
}


def _bodies(out: bytes) -> list[bytes]:
    return [part.split(b"\r\n\r\n", 1)[1] for part in out.split(b"HTTP/1.1 200 OK")[1:]]


@pytest.mark.parametrize("upgrade", sorted(UPGRADES))
async def test_an_upgrade_request_is_served_as_plain_http_with_its_body_then_closed(
    upgrade: str,
) -> None:
    """Regression: the body of a request with `Connection: Upgrade` was skipped by the parser
    (`curl --http2` to a POST route: the gateway's 400 "not valid JSON"). The connection
    closes after it: a proxy that took the request for a tunnel's start keeps no tunnel."""
    head = b"POST /up HTTP/1.1\r\nHost: h\r\n" + UPGRADES[upgrade]
    async with serving(App()) as (port, _):
        pipelined = await _exchange(
            port,
            head + b"Content-Length: 5\r\n\r\nhello"
            + b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n",
        )  # fmt: skip
        chunked = await _exchange(
            port, head + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
        )
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(head + b"Content-Length: 6\r\n\r\n")  # the body comes later
            await anyio.sleep(0.05)
            await stream.send(b"lat")
            await anyio.sleep(0.05)
            await stream.send(b"er")
            await anyio.sleep(0.05)
            await stream.send(b"!GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
            later = b""
            with anyio.fail_after(2):
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        later += await stream.receive()
    assert _bodies(pipelined) == [b"POST /up  hello"]
    assert b"101" not in pipelined.split(b"\r\n", 1)[0]
    assert _bodies(chunked) == [b"POST /up  abc"]
    assert _bodies(later) == [b"POST /up  later!"]
    for out in (pipelined, chunked, later):
        assert b"connection: close\r\n" in out


async def test_an_answer_before_the_end_of_its_request_body_closes_the_connection_at_once() -> None:
    """Regression: after an early answer (the gateway's 413 on a chunked body) the connection
    read on what the client sent, throwing it away, until idle for keep_alive seconds."""

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the first chunk, then no more
        await send(_start([(b"content-length", b"0")], status=413))
        await send({"type": "http.response.body", "body": b""})

    conn, transport = _connection(refuse)
    conn.data_received(
        b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert transport.writes[0].startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert b"connection: close\r\n" in transport.writes[0]
    assert transport.closed


async def test_an_early_answer_reaches_a_client_still_sending_then_the_connection_closes() -> None:
    """The 413 before the rest of a body: the write side is shut after it (the client reads
    the answer and the end while it goes on sending; no reset loses the answer), what it
    still sends is dropped, and within LINGER seconds the connection is gone."""

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(_start([(b"content-length", b"0")], status=413))
        await send({"type": "http.response.body", "body": b""})

    gone = anyio.Event()
    async with (
        serving(cast(App, refuse)) as (port, _),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = b""
        started = time.monotonic()

        async def send_on() -> None:
            chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
            try:
                while True:
                    await stream.send(chunk)
                    await anyio.sleep(0.005)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                gone.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_on)
            with anyio.fail_after(2), contextlib.suppress(anyio.EndOfStream):
                while True:
                    answer += await stream.receive()
            ended_after = time.monotonic() - started
            with anyio.fail_after(LINGER + 2):
                await gone.wait()
            gone_after = time.monotonic() - started
            tg.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert ended_after < 1  # the end came with the answer, not after a timeout
    # Half closed, not closed: what it sent after the end was still taken (a closed socket
    # resets at the next bytes, which can take the answer with it), for at most LINGER.
    assert ended_after + 0.5 < gone_after < LINGER + 2


class Deadline(App):
    """Reads the body with receive(0.3); a stall is a 408 and `read` holds what came."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["extensions"][RECEIVE_TIMEOUT] is True
        within = cast(ReceiveWithin, receive)
        body = b""
        try:
            while True:
                message = await within(0.3)
                body += message["body"]
                if not message["more_body"]:
                    break
        except TimeoutError:
            self.read.append(body)
            await send(_start([(b"content-length", b"0")], status=408))
            await send({"type": "http.response.body", "body": b""})


async def test_receive_with_a_timeout_gives_up_on_a_body_that_stalls_between_reads() -> None:
    """A body that keeps coming is read however long it takes in all; one that stops for
    longer than the timeout raises TimeoutError in receive(), and the answer closes."""
    app = Deadline()
    async with serving(app) as (port, _), await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nabcd")
        for part in (b"ef", b"gh"):  # 0.4 s in all, never 0.3 s between two reads
            await anyio.sleep(0.2)
            await stream.send(part)
        stalled = time.monotonic()
        out = b""
        with anyio.fail_after(3):
            while True:
                try:
                    out += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        waited = time.monotonic() - stalled
    assert app.read == [b"abcdefgh"]
    assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in out
    assert 0.25 < waited < 2
