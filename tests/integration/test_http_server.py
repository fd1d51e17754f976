"""vllmd's HTTP/1.1 server (the gateway's and the metrics listener's) on real sockets, and at its
transport seam where the number of writes is the point: framing, keep-alive and pipelining,
`Expect: 100-continue`, disconnects (receive() and the ON_DISCONNECT callback), flow control,
its own plain answers (400, 431, 500, 503) and shutdown."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tests.integration.harness import eventually
from vllmd.httpserver.asgi import Message, Receive, Scope, Send
from vllmd.httpserver.connection import Connection
from vllmd.httpserver.exchange import ON_DISCONNECT
from vllmd.httpserver.server import Server

pytestmark = pytest.mark.anyio


class App:
    """Echoes what it was asked; `/stream` streams until told to stop; `/slow` waits;
    `/boom` fails; `/nolength` answers without content-length."""

    def __init__(self) -> None:
        self.disconnects: list[str] = []
        self.disconnected = asyncio.Event()
        self.callbacks: list[str] = []
        self.release = asyncio.Event()
        self.cancelled: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        scope["extensions"][ON_DISCONNECT](lambda: self.callbacks.append(path))
        try:
            if path == "/boom":
                raise ValueError("boom")
            if path == "/stream":
                await send(_start([(b"content-type", b"text/event-stream")]))
                await send(
                    {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}
                )
                self.disconnects.append(_kind(await receive()) + " " + path)
                self.disconnected.set()
                return
            if path == "/slow":
                await self.release.wait()
            if path == "/nolength":
                await send(_start([]))
                for part in (b"ab", b"", b"cd"):
                    await send({"type": "http.response.body", "body": part, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            out = f"{scope['method']} {path} {scope['query_string'].decode()} ".encode() + body
            await send(_start([(b"content-length", str(len(out)).encode())]))
            await send({"type": "http.response.body", "body": out})
            if path == "/after":  # work after the answer that ends in a cancelled future
                future = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_later(0.2, future.cancel)
                await future
        except asyncio.CancelledError:
            self.cancelled.append(path)
            raise


def _start(headers: list[tuple[bytes, bytes]], status: int = 200) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


def _kind(message: Message) -> str:
    return str(message["type"])


@asynccontextmanager
async def serving(app: App, **options: Any) -> AsyncIterator[tuple[int, Server]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    options.setdefault("max_connections", 16)
    options.setdefault("graceful", 1.0)
    server = Server(app, **options)
    await server.start(sock)
    try:
        yield sock.getsockname()[1], server
    finally:
        await server.shutdown()


async def _exchange(port: int, data: bytes, wait: float = 2.0) -> bytes:
    """Send `data`, then read until the server closes or goes quiet for `wait` seconds."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(data)
        out = b""
        with anyio.move_on_after(wait):
            while True:
                try:
                    out += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        return out


async def test_pipelined_requests_are_answered_in_order_with_their_own_bodies() -> None:
    async with serving(App()) as (port, _):
        out = await _exchange(
            port,
            b"GET /one?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /three HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
            b"GET /a%20b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in out.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"GET /one x=1 ", b"POST /two  abc", b"POST /three  def", b"GET /a b  "]
    assert out.count(b"\r\ndate: ") == 4
    assert out.endswith(b"connection: close\r\ncontent-length: 10\r\n\r\nGET /a b  ") or (
        b"connection: close" in out.split(b"HTTP/1.1 200 OK")[-1]
    )


async def test_an_answer_without_length_is_chunked_for_http11_and_closed_for_http10() -> None:
    async with serving(App()) as (port, _):
        chunked = await _exchange(port, b"GET /nolength HTTP/1.1\r\nHost: h\r\n\r\n", wait=0.5)
        old = await _exchange(port, b"GET /nolength HTTP/1.0\r\n\r\n")
    assert b"transfer-encoding: chunked\r\n" in chunked
    assert chunked.endswith(b"\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
    assert b"transfer-encoding" not in old and b"connection: close\r\n" in old
    assert old.endswith(b"\r\n\r\nabcd")


async def test_head_gets_the_head_only_and_100_continue_is_sent_before_the_body() -> None:
    async with serving(App()) as (port, _):
        head = await _exchange(port, b"HEAD /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(
                b"POST /y HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
            )
            with anyio.fail_after(2):
                interim = await stream.receive()
            await stream.send(b"hi")
            with anyio.fail_after(2):
                final = await stream.receive()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 9\r\n" in head
    assert head.endswith(b"\r\n\r\n")  # no body
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n") and final.endswith(b"POST /y  hi")


async def test_a_client_leaving_mid_stream_is_a_disconnect_and_a_callback_at_once() -> None:
    app = App()
    async with serving(app) as (port, server):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
        with anyio.fail_after(2):
            first = await stream.receive()
        assert b"text/event-stream" in first
        began = time.monotonic()
        await stream.aclose()
        with anyio.fail_after(2):
            await app.disconnected.wait()
        assert time.monotonic() - began < 0.5
        assert app.disconnects == ["http.disconnect /stream"]
        assert app.callbacks == ["/stream"]
        # A request answered in full calls no callback when its client leaves afterwards.
        await _exchange(port, b"GET /done HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert app.callbacks == ["/stream"]
        assert not server.connections or all(c.current is None for c in server.connections)


async def test_malformed_http_and_huge_heads_get_plain_answers_and_the_server_stays() -> None:
    app = App()
    async with serving(app, max_head=1024) as (port, _):
        bad = await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        huge = await _exchange(port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        boom = await _exchange(port, b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n")
        fine = await _exchange(port, b"GET /ok HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close" in bad
    assert huge.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert boom.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert fine.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_connections_over_the_limit_get_503_and_the_others_are_served() -> None:
    async with serving(App(), max_connections=2) as (port, _):
        held = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        await anyio.sleep(0.05)
        over = await _exchange(port, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        await held[0].send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        with anyio.fail_after(2):
            served = await held[0].receive()
        for stream in held:
            await stream.aclose()
    assert over.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert served.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_idle_connections_close_after_keep_alive_and_a_slow_head_too() -> None:
    async with serving(App(), keep_alive=1.0) as (port, _):
        began = time.monotonic()
        kept = await _exchange(port, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", wait=5)
        kept_for = time.monotonic() - began
        began = time.monotonic()
        partial = await _exchange(port, b"GET /x HTTP/1.1\r\nHost:", wait=5)
        slow_for = time.monotonic() - began
    assert kept.startswith(b"HTTP/1.1 200 OK") and 0.9 < kept_for < 3.0
    assert partial == b"" and 0.9 < slow_for < 3.0


async def test_shutdown_closes_idle_connections_and_cancels_requests_past_the_grace() -> None:
    app = App()
    async with serving(app, graceful=0.3) as (port, server):
        idle = await anyio.connect_tcp("127.0.0.1", port)
        await idle.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        await idle.receive()
        busy = await anyio.connect_tcp("127.0.0.1", port)
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        await anyio.sleep(0.05)
        began = time.monotonic()
        await server.shutdown()
        took = time.monotonic() - began
        with anyio.fail_after(1):
            assert await _drain(idle) == b""
            assert await _drain(busy) == b""
        await idle.aclose()
        await busy.aclose()
        await anyio.sleep(0.01)
        assert app.cancelled == ["/slow"]
        assert 0.25 < took < 1.0
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


async def test_shutdown_lets_a_request_in_flight_finish_within_the_grace() -> None:
    app = App()
    async with serving(app, graceful=5.0) as (port, server):
        busy = await anyio.connect_tcp("127.0.0.1", port)
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        await anyio.sleep(0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.shutdown)
            await anyio.sleep(0.1)
            app.release.set()
            with anyio.fail_after(2):
                answer = await _drain(busy)
            await busy.aclose()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in answer
    assert app.cancelled == []


async def _drain(stream: anyio.abc.SocketStream) -> bytes:
    out = b""
    while True:
        try:
            out += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return out


# --- at the transport seam --------------------------------------------------------------------


class Transport(asyncio.Transport):
    """Records writes; reading and closing as flags."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False  # (a lingering close is tested on real sockets)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("sockname", "peername") else default


def _connection(app: Any) -> tuple[Connection, Transport]:
    conn = Connection(Server(app, max_connections=8, graceful=1))
    transport = Transport()
    conn.connection_made(transport)
    return conn, transport


async def test_a_whole_answer_is_one_write_and_a_streams_head_goes_before_its_first_chunk() -> None:
    chunk = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        if scope["path"] == "/plain":
            await send(_start([(b"content-length", b"2")]))
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send(_start([(b"content-type", b"text/event-stream")]))
        await chunk.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    conn, transport = _connection(app)
    conn.data_received(b"GET /plain HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\nok")
    conn.data_received(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(transport.writes) == 2 and transport.writes[1].endswith(b"chunked\r\n\r\n")
    chunk.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert transport.writes[2:] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]
    assert not transport.closed


async def test_send_waits_while_the_client_is_slow_and_reading_pauses_for_a_large_body() -> None:
    sent: list[int] = []
    got: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            got.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send(_start([]))
        for n in range(3):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            sent.append(n)
        await send({"type": "http.response.body", "body": b""})

    conn, transport = _connection(app)
    conn.pause_writing()  # the client reads nothing yet
    size = 300 * 1024
    conn.data_received(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
    conn.data_received(b"a" * size)
    assert not transport.reading  # over READ_HIGH buffered: the socket waits
    for _ in range(10):
        await asyncio.sleep(0)
    assert sum(got) == size and transport.reading
    assert sent == []  # the first chunk waits for the client to drain
    conn.resume_writing()
    for _ in range(10):
        await asyncio.sleep(0)
    assert sent == [0, 1, 2] and transport.writes[-1] == b"0\r\n\r\n"


async def test_a_lost_client_never_leaves_send_waiting() -> None:
    done = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(_start([]))
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b"y", "more_body": True})
        done.set()

    conn, _ = _connection(app)
    conn.pause_writing()
    conn.data_received(b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert not done.is_set()
    conn.connection_lost(None)
    with anyio.fail_after(1):
        await done.wait()


async def test_an_unfinished_header_value_is_cut_off_at_the_head_limit() -> None:
    async with serving(App(), max_head=4096) as (port, _):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        sent = 0
        async with stream:
            await stream.send(b"GET / HTTP/1.1\r\nX-Big: ")
            with anyio.fail_after(5):
                while sent < 64 * 1024 * 1024:  # a value that never ends
                    try:
                        await stream.send(b"a" * 1024)
                    except (anyio.BrokenResourceError, OSError):
                        break
                    sent += 1024
                    await anyio.lowlevel.checkpoint()
    # The server gave up near 4 KiB (what the kernel's buffers held on top is all that went).
    assert sent < 8 * 1024 * 1024


async def test_an_upgrade_is_served_as_plain_http_and_then_closed() -> None:
    async with serving(App()) as (port, _):
        out = await _exchange(
            port,
            b"GET /up HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n",
        )
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"GET /up  ")
    assert b"connection: close\r\n" in out and b"/next" not in out


async def test_an_answer_before_the_100_continue_body_closes_the_connection() -> None:
    async def early(scope: Scope, receive: Receive, send: Send) -> None:
        await send(_start([(b"content-length", b"0")], status=401))
        await send({"type": "http.response.body", "body": b""})

    conn, transport = _connection(early)
    conn.data_received(
        b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert transport.writes[0].startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"100 Continue" not in b"".join(transport.writes)
    assert b"connection: close\r\n" in transport.writes[0] and transport.closed


async def test_a_client_that_asks_faster_than_it_reads_gets_one_answer_at_a_time() -> None:
    conn, transport = _connection(App())
    conn.pause_writing()
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" * 50)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(transport.writes) == 1 and not transport.reading  # the rest wait for a read
    conn.resume_writing()
    for _ in range(200):
        await asyncio.sleep(0)
    assert len(transport.writes) == 50 and transport.reading


async def test_garbage_after_a_started_answer_drops_the_connection_without_a_400() -> None:
    app = App()
    conn, transport = _connection(app)
    conn.data_received(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    conn.data_received(b"\x00\x01 not http\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert transport.closed
    assert not any(b"400 Bad Request" in w for w in transport.writes)


async def test_a_client_that_reads_nothing_is_cut_off_and_a_stuck_close_aborted() -> None:
    conn, transport = _connection(App())
    conn.data_received(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    conn.pause_writing()
    now = time.monotonic()
    conn.sweep(now + 1.0)
    assert not transport.closed
    conn.sweep(now + conn.server.send_timeout + 1.0)
    assert transport.closed  # aborted: the request in hand hears of it as a disconnect
    closing, stuck = _connection(App())
    closing.close()  # e.g. after a `connection: close` answer the client never reads
    assert stuck.closed
    stuck.closed = False  # the transport keeps flushing; only an abort ends it
    closing.sweep(time.monotonic() + closing.server.keep_alive + 1.0)
    assert stuck.closed


async def test_a_refused_connection_holds_no_slot() -> None:
    async with serving(App(), max_connections=1) as (port, _):
        first = await anyio.connect_tcp("127.0.0.1", port)
        await anyio.sleep(0.05)
        refused = await anyio.connect_tcp("127.0.0.1", port)  # idle: sends nothing
        await anyio.sleep(0.05)
        await first.aclose()
        await anyio.sleep(0.05)
        third = await _exchange(port, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await refused.aclose()
    assert third.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_packet_with_a_whole_request_and_the_start_of_the_next_is_no_large_head() -> None:
    async with serving(App(), max_head=4096) as (port, _):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            body = b"x" * 100_000
            await stream.send(
                b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                + b"GET /b HTTP/1.1\r\nHost: h\r\n"  # the next head, unfinished
            )
            await anyio.sleep(0.1)
            await stream.send(b"Connection: close\r\n\r\n")
            with anyio.fail_after(3):
                out = await _drain(stream)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"GET /b  ")


async def test_a_broken_body_of_the_request_in_hand_is_a_400_and_frees_the_connection() -> None:
    app = App()
    async with serving(app, max_connections=1) as (port, server):
        bad = await _exchange(
            port,
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\nZZ not a chunk size\r\n\r\n",
        )
        await anyio.sleep(0.05)
        fine = await _exchange(port, b"GET /ok HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert not server.tasks
    assert bad.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert fine.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_keep_alive_connection_has_one_worker_that_ends_with_it() -> None:
    """The app runs for a connection's requests in one task: it serves each request in turn,
    outlives none of them by more than the connection, and a closed connection leaves no
    task for shutdown to wait for."""
    async with serving(App(), graceful=5.0) as (port, server):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            for i in range(5):
                await stream.send(b"GET /r%d HTTP/1.1\r\nHost: h\r\n\r\n" % i)
                answer = b""
                while not answer.endswith(b"GET /r%d  " % i):
                    answer += await stream.receive()
                assert len(server.tasks) == 1
        with anyio.fail_after(2):
            while server.tasks or server.connections:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        began = time.monotonic()
    assert time.monotonic() - began < 1.0  # shutdown waited for nothing


async def test_an_app_cancelled_after_its_answer_leaves_the_next_request_served() -> None:
    """Regression: an app's own CancelledError after its answer was complete ended the
    connection's worker with the next request begun and never run (the client hung)."""
    async with serving(App()) as (port, _):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
            answer = b""
            while not answer.endswith(b"GET /after  "):
                answer += await stream.receive()
            await stream.send(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")  # while /after runs
            answer = b""
            with anyio.fail_after(3):
                while not answer.endswith(b"GET /next  "):
                    answer += await stream.receive()
    assert answer.startswith(b"HTTP/1.1 200")


async def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    """Regression: each connection left a reference cycle (its parser's callbacks, its
    extensions' bound method, its last request) that only a full collection freed: the
    daemon's RSS grew with the connections it had served (bench/rss_bursts.py)."""
    gc.collect()
    gc.disable()
    try:
        async with serving(App()) as (port, server):
            refs: list[weakref.ref[Connection]] = []
            for n in range(20):
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    await stream.send(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)
                    assert (await stream.receive()).startswith(b"HTTP/1.1 200 OK")
                    refs += [weakref.ref(conn) for conn in server.connections]
            await eventually(lambda: not server.connections, timeout=5)
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            alive = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    assert len(refs) == 20 and alive == 0
