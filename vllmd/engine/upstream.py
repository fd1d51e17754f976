"""The gateway's HTTP/1.1 client to one engine: keep-alive connections on asyncio protocols,
responses parsed by httptools (the C parser uvicorn already uses for the client side).

Why not httpx here: its pool (httpcore) walks every idle connection per request and asks
each whether it expired through anyio's typed attributes, and h11 parses in Python; with 32
clients that cost more than the rest of the gateway together. aiohttp's client has a C parser
too, but adds a dependency and a session/connector layer (timeouts, cookie jar, tracing
hooks) the proxy does not use; a protocol of ~200 lines sends a request in one write and
hands body chunks over as they arrive. httpx stays vllmd's client for everything else
(health, warm-up, sleep, metrics) and the tests' seam (`make_client(transport=...)`).

Errors are vllmd.engine.answers' (named as httpx names them; the tests' httpx path translates
its errors into them), so the proxy has one error vocabulary for either client, and the
daemon does not import httpx until it talks to an engine (docs/performance.md "Start-up").

Idle connections are kept LIFO (the warmest first); one the engine closed is known at once
(`connection_lost`) and never reused, nor one idle longer than KEEP_IDLE (the engine's uvicorn
closes its side after 5 s). A reused connection that ends before a single byte of its answer
and within RETRY_WINDOW of the request going out was the engine closing it as the request
went out: the request is sent once more on another connection. Later than that the engine
may have taken the request (a POST is not sent twice): the error stands. Bytes the engine
sends when no answer is expected end the connection, never reach the next answer. Reading
pauses while a slow client leaves more than `HIGH_WATER` bytes unsent, so a stream never
piles up in the daemon. An answer's head over MAX_HEAD is a `RemoteProtocolError` (httptools
would hold a header that never ends whole, however long).

`Pool.reads` counts reads on its connections: the progress the liveness check samples.
"""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from typing import cast

import httptools

from vllmd.engine.answers import (
    ConnectError,
    ConnectTimeout,
    ReadError,
    RemoteProtocolError,
    Response,
    UpstreamError,
)

HIGH_WATER = 256 * 1024
MAX_HEAD = 64 * 1024  # bytes of an answer's status line and headers (the gateway's request bound)
KEEP_IDLE = 4.0  # seconds a connection may sit idle and still be used (uvicorn's is 5)
RETRY_WINDOW = 0.1  # seconds after sending in which a lost connection is the keep-alive race
MAX_IDLE = 512  # above the busiest moment, else a burst of 256 clients churns connections


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.received = False  # any byte of the current answer
        self.reads = 0  # reads of its answers (its pool sums them: the engine's progress)
        self._head_size = 0  # bytes of the current answer's parsed head lines
        self._unfinished = 0  # bytes read while its head was still unfinished
        self._paused = False
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.keep_alive = True
        self.error: Exception | None = None
        self.expecting = False  # an answer is due: from request() until its end
        self.sent_at = 0.0  # when the current request went out (the loop's clock)
        self.idle_since = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if not self.expecting:  # bytes no request asked for: this connection is done
            self.abort()
            return
        self.received = True
        self.reads += 1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(RemoteProtocolError("the engine upgraded the connection"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # an error of a callback's (a head too large)
            error = cause if isinstance(cause, UpstreamError) else None
            self._fail(error or RemoteProtocolError(f"bad answer from the engine: {exc}"))
            return
        if not self.status:  # the head is still unfinished: all of this was head
            self._unfinished += len(data)  # (httptools holds a header line that never ends)
            if self._unfinished > MAX_HEAD:
                self._fail(_head_too_large())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if not self.complete:
            what = "closed the connection" if exc is None else f"failed ({exc})"
            self._fail(ReadError(f"the engine {what} before the answer ended"))
        # Its parser's callbacks refer back to it: freed at once, not by the cycle collector
        # (the transport lets go of it by itself). Nothing is parsed after this.
        del self._parser

    def pause_writing(self) -> None:  # the request is written at once; nothing to pause
        pass

    # --- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.expecting:  # (a second answer in the same read is not this request's)
            self.headers.append((name, value))
            self._head_size += len(name) + len(value) + 4  # ": " and the line break
            if self._head_size > MAX_HEAD:
                raise _head_too_large()

    def on_headers_complete(self) -> None:
        if not self.expecting:
            self.abort()
            return
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self.headers = []
            return
        _wake(self._head)

    def on_body(self, body: bytes) -> None:
        if not self.expecting:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        _wake(self._waiter)

    def on_message_complete(self) -> None:
        if not self.expecting or 100 <= self.status < 200:
            return
        self.expecting = False
        self.complete = True
        _wake(self._waiter)  # (the head was woken when it was complete)

    # --- used by Pool and Response ----------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        _wake(self._head)
        _wake(self._waiter)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    async def request(self, data: bytes) -> None:
        """Send one whole request and wait for the head of its answer."""
        assert self._transport is not None
        if self.closed or self.error is not None:
            raise self.error or ReadError("the engine closed the connection")
        self.received = self.complete = False
        self.status, self.headers, self._chunks = 0, [], deque()
        self._head_size = self._unfinished = 0
        self.expecting = True
        self._head = self._loop.create_future()
        self.sent_at = self._loop.time()
        self._transport.write(data)
        await self._head
        self._head = None
        if self.error is not None:
            raise self.error

    def whole(self) -> bytes | None:
        """The whole body at once when all of it has arrived and none was taken (a plain
        answer, most often in one read), else None: `chunk()` then."""
        if not self.complete or self.error is not None or self._paused:
            return None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    async def chunk(self) -> bytes | None:
        """The body that has arrived since the last call (waiting for some), None at its end."""
        while True:
            if self._chunks:
                # Everything that has arrived, at once: nothing is held back, and a burst of
                # small SSE chunks costs the client's socket one write instead of one each.
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
                return data
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def mark_idle(self) -> None:
        self.idle_since = self._loop.time()

    def idle_for(self) -> float:
        # The connection's loop, not asyncio.get_running_loop(): on Python 3.11 that is a
        # getpid() system call each time.
        return self._loop.time() - self.idle_since

    def raced(self) -> bool:
        """Whether the current request's connection was lost right as it went out."""
        return self._loop.time() - self.sent_at < RETRY_WINDOW

    def release(self) -> None:
        """The caller is done: keep the connection when its answer was read to the end."""
        if self.complete and self.keep_alive and not self.closed and not self._chunks:
            self._pool.keep(self)
        else:
            self.abort()


def _head_too_large() -> RemoteProtocolError:
    return RemoteProtocolError(f"the engine's answer head is over {MAX_HEAD} bytes")


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class Pool:
    """Keep-alive connections to one engine, on a Unix socket or TCP."""

    def __init__(
        self,
        *,
        uds: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
        auth: bytes = b"",
    ) -> None:
        self._uds = str(uds) if uds is not None else None
        self._host, self._port = host, port
        self._connect_timeout = connect_timeout
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()  # every connection not lost yet, idle or in use
        self._closed = False
        self._reads_gone = 0  # reads on its connections already lost
        # Every request starts with these bytes after its request line.
        self._fixed = b"host: engine\r\n" + (b"authorization: " + auth + b"\r\n" if auth else b"")
        self._lines: dict[str, bytes] = {}

    def keep(self, conn: Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            conn.abort()
        else:
            conn.mark_idle()
            self._idle.append(conn)

    @property
    def reads(self) -> int:
        """Reads on its connections so far: the engine's progress on answers."""
        return self._reads_gone + sum(conn.reads for conn in self._open)

    def forget(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.remove(conn)
            self._reads_gone += conn.reads
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close every idle connection; those in use close when their answers are done."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()

    def abort(self) -> None:
        """Close every connection, those in use too: their answers fail (a `ReadError`) at
        once, as when the engine dies."""
        self.close()
        for conn in list(self._open):
            conn.abort()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._uds is not None:
                    _, conn = await loop.create_unix_connection(lambda: Connection(self), self._uds)
                else:
                    _, conn = await loop.create_connection(
                        lambda: Connection(self), self._host, self._port
                    )
        except TimeoutError:
            raise ConnectTimeout("no connection to the engine in time") from None
        except OSError as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from None
        if self._closed:  # aborted while it connected
            conn.abort()
            raise ConnectError("the engine's connections are closed")
        self._open.add(conn)
        return conn

    def encode(self, route: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        line = self._lines.get(route)
        if line is None:
            line = self._lines[route] = f"POST {route} HTTP/1.1\r\n".encode() + self._fixed
        parts = [line, b"content-length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", body)
        return b"".join(parts)

    async def post(self, route: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
        """Send a POST and return the answer with its body still to be read."""
        if self._closed:
            raise ConnectError("the engine's connections are closed")
        data = self.encode(route, body, headers)
        while self._idle:
            conn = self._idle.pop()
            if conn.closed or conn.idle_for() > KEEP_IDLE:
                conn.abort()  # the engine is about to close it, if it has not
                continue
            try:
                await conn.request(data)
            except UpstreamError:
                if conn.received or not conn.raced():
                    raise
                continue  # closed by the engine as the request went out: try another
            except BaseException:
                conn.abort()
                raise
            return Response(conn)
        conn = await self._connect()
        try:
            await conn.request(data)
        except BaseException:
            conn.abort()
            raise
        return Response(conn)
