"""vllmd's HTTP/1.1 server for the gateway and the metrics listener: asyncio protocols with
httptools' request parser (the C parser of vllmd's upstream pool), serving plain ASGI apps.

It serves the part of ASGI's HTTP scope that vllmd's apps use, and does what a proxy's front
end must do cheaply: keep-alive, pipelined requests answered in order, `Expect:
100-continue`, flow control both ways (reading pauses while a body waits for the app,
`send()` waits while the client is slow), `http.disconnect` as soon as the client leaves. An
answer's head is held until its first body part or the end of the loop's current pass,
whichever is first, so a whole answer is one write and a stream's head still goes at once
(uvicorn writes the two separately: a third of a proxied request's socket work).

Idle connections close after `keep_alive` seconds (a request head that is still incomplete
by then too); connections beyond `max_connections` get a plain 503 and are closed; malformed
HTTP a plain 400. At `shutdown()` the listener closes, idle connections close, requests in
flight get `graceful` seconds to finish and are cancelled after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httptools
import structlog

from vllmd.http.asgi import Receive, Scope, Send
from vllmd.http.exchange import ON_DISCONNECT, READ_HIGH, STATUS_LINES, Exchange

log = structlog.get_logger("vllmd.http")

App = Callable[[Scope, Receive, Send], Awaitable[None]]

KEEP_ALIVE = 5.0  # seconds an idle connection is kept (uvicorn's, nginx's is 75)
MAX_HEAD = 64 * 1024  # bytes of a request's URL and headers


def _plain(status: int, text: str) -> bytes:
    """A complete answer of the server's own (uvicorn's plain-text ones), closing."""
    body = text.encode()
    return (
        STATUS_LINES[status]
        + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
        + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


BAD_REQUEST = _plain(400, "Invalid HTTP request received.")
HEAD_TOO_LARGE = _plain(431, "Request header fields too large.")
UNAVAILABLE = _plain(503, "Service Unavailable")
INTERNAL_ERROR = _plain(500, "Internal Server Error")


class Server:
    """Serves `app` on listening sockets handed to `start()`, until `shutdown()`."""

    def __init__(
        self,
        app: App,
        *,
        max_connections: int,
        graceful: float,
        keep_alive: float = KEEP_ALIVE,
        max_head: int = MAX_HEAD,
    ) -> None:
        self.app = app
        self.max_connections = max_connections
        self.graceful = graceful
        self.keep_alive = keep_alive
        self.max_head = max_head
        self.connections: set[Connection] = set()
        self.date = b""  # the `date` header line, renewed every second by the sweeper
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._emptied: asyncio.Event | None = None  # set when the last connection closes
        self._stamp()

    async def start(self, sock: socket.socket) -> None:
        """Accept connections on `sock` (bound and listening) from now on."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    async def shutdown(self) -> None:
        """Stop accepting; let requests in flight finish within `graceful` seconds."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        try:
            if self.connections:
                self._emptied = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._emptied.wait(), self.graceful)
        finally:  # also when the daemon stops waiting: nothing is left serving
            for conn in list(self.connections):
                conn.cancel()
            if self._sweeper is not None:
                self._sweeper.cancel()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._emptied is not None and not self.connections:
            self._emptied.set()

    def _stamp(self) -> None:
        self.date = b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"

    async def _sweep(self) -> None:
        """Once a second: the date line, and connections idle past `keep_alive` closed (one
        timer for all of them, where a timer per request would cost every request)."""
        while True:
            await asyncio.sleep(1.0)
            self._stamp()
            expired = time.monotonic() - self.keep_alive
            for conn in list(self.connections):
                if conn.idle_since is not None and conn.idle_since < expired:
                    conn.close()


class Connection(asyncio.Protocol):
    """One client connection: parses its requests and runs the app for each, in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.scope_base: dict[str, Any] = {}
        self.idle_since: float | None = time.monotonic()  # None while a request is in hand
        self.lost = False
        self.refused = False
        self.closing = False  # no more requests: answer the one in hand, then close
        self.paused = False  # the transport's write buffer is full
        self.drained: asyncio.Future[None] | None = None
        self.parsing: Exchange | None = None  # the request whose bytes are being parsed
        self.current: Exchange | None = None  # the request the app is answering
        self.queue: deque[Exchange] = deque()  # pipelined requests after `current`
        self.task: asyncio.Task[None] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.server.connections.add(self)
        server = transport.get_extra_info("sockname")
        client = transport.get_extra_info("peername")
        self.scope_base = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "scheme": "http",
            "root_path": "",
            "server": tuple(server[:2]) if isinstance(server, tuple) else None,
            "client": tuple(client[:2]) if isinstance(client, tuple) else None,
        }
        # Over the limit: every request on this connection gets a 503, then it closes.
        self.refused = len(self.server.connections) > self.server.max_connections

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.forget(self)
        self.queue.clear()
        if self.current is not None:
            self.current.gone()
        self._drained()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(BAD_REQUEST)  # no websockets, no h2c
        except httptools.HttpParserError:
            self._refuse(BAD_REQUEST if self._head_size <= self.server.max_head else HEAD_TOO_LARGE)

    def eof_received(self) -> bool | None:
        return None  # the transport closes: the client will send nothing more

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._drained()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._grow(len(name) + len(value))

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.server.max_head:
            raise httptools.HttpParserError("request head too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = httptools.parse_url(self._url)
        raw_path: bytes = url.path
        path = raw_path.decode("ascii", "replace")
        if "%" in path:
            path = unquote(path)
        method = parser.get_method().decode("ascii")
        scope = dict(self.scope_base)
        scope["http_version"] = parser.get_http_version()
        scope["method"] = method
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = url.query or b""
        scope["headers"] = self._headers
        expect = False
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue":
                expect = True
        exchange = Exchange(self, scope, parser.should_keep_alive(), method == "HEAD", expect)
        scope["extensions"] = {ON_DISCONNECT: exchange.on_disconnect}
        self.parsing = exchange
        self.idle_since = None
        if self.current is None:
            self._begin(exchange)
        else:
            self.queue.append(exchange)
            self._pause_reading()  # one answer at a time: the rest wait in the socket

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is None or exchange.done:
            return
        if exchange.feed(body) > READ_HIGH:
            self._pause_reading()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        if exchange is None:
            return
        exchange.end_body()

    # --- serving ----------------------------------------------------------------------------

    def _begin(self, exchange: Exchange) -> None:
        self.current = exchange
        if self.refused or self.closing:
            self._refuse(UNAVAILABLE)
            return
        self.task = asyncio.get_running_loop().create_task(self._run(exchange))

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self.server.app(exchange.scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            log.exception("app_failed", path=exchange.scope["path"])
        if exchange.done:
            return
        if exchange.started:
            self.abort()  # the answer was cut short: the client must not take it as whole
        else:
            self._refuse(INTERNAL_ERROR)

    def finished(self, exchange: Exchange) -> None:
        """`exchange`'s answer is all written: the next request, or idle, or close."""
        exchange.wake()  # its app may still wait in receive(): that is a disconnect now
        self.current = None
        if not exchange.keep_alive or self.closing:
            self.close()
            return
        if self.queue:
            self._begin(self.queue.popleft())
            if not self.queue:
                self.resume_reading()
            return
        self.idle_since = time.monotonic()
        self.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.paused and not self.lost:
            if self.drained is None:
                self.drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.drained)

    def _drained(self) -> None:
        if self.drained is not None:
            if not self.drained.done():
                self.drained.set_result(None)
            self.drained = None

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def _refuse(self, answer: bytes) -> None:
        """Answer with one of the server's own plain answers and close."""
        if self.current is not None:
            self.current.abandon()
        self.write(answer)
        self.close()

    def shutdown(self) -> None:
        """The server stops: close now when idle, else after the answer in hand."""
        self.closing = True
        if self.current is None:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def cancel(self) -> None:
        """Past the grace period: the app's work on this connection ends here."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.abort()
