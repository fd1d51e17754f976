"""vllmd's HTTP/1.1 server for the gateway and the metrics listener: asyncio protocols with
httptools' request parser (the C parser of vllmd's upstream pool), serving plain ASGI apps.

It serves the part of ASGI's HTTP scope that vllmd's apps use, and does what a proxy's front
end must do cheaply: keep-alive, pipelined requests answered in order, `Expect:
100-continue`, flow control both ways (reading pauses while a body waits for the app,
`send()` waits while the client is slow), `http.disconnect` as soon as the client leaves. An
answer's head is held until its first body part or the end of the loop's current pass,
whichever is first, so a whole answer is one write and a stream's head still goes at once
(uvicorn writes the two separately: a third of a proxied request's socket work).

What a client must not do to the daemon is cut off: idle connections close after
`keep_alive` seconds (a request head still incomplete by then too), a head over `max_head`
bytes gets a 431 (counted as its bytes arrive, finished or not), a client that reads nothing
of an answer for `send_timeout` seconds is dropped (its request hears of it as a disconnect),
and one that asks faster than it reads gets its next answer only once it has read the last.
A body that stalls is the app's to bound: `receive(seconds)` (the RECEIVE_TIMEOUT extension)
raises TimeoutError after that long without more of it, and an answer complete before its
request's body is all in closes the connection (the rest is not read to be thrown away).
A request that asks for an upgrade (h2c, a websocket) is served as plain HTTP/1.1, body and all.
Connections beyond `max_connections` get a plain 503 and are closed; malformed HTTP a plain
400 (never in the middle of an answer: that connection is dropped). At `shutdown()` the
listener closes, idle connections close, requests in flight get `graceful` seconds to finish
and are cancelled after that. `connection.py` holds a connection, `exchange.py` a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import socket
import time
from collections.abc import Awaitable, Callable

from vllmd.httpserver.asgi import Receive, Scope, Send
from vllmd.httpserver.connection import Connection
from vllmd.httpserver.exchange import Exchange

App = Callable[[Scope, Receive, Send], Awaitable[None]]

KEEP_ALIVE = 5.0  # seconds an idle connection is kept (uvicorn's, nginx's is 75)
SEND_TIMEOUT = 60.0  # seconds a client may read nothing of an answer before it is cut off
MAX_HEAD = 64 * 1024  # bytes of a request's URL and headers


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
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.app = app
        self.max_connections = max_connections
        self.graceful = graceful
        self.keep_alive = keep_alive
        self.max_head = max_head
        self.send_timeout = send_timeout
        self.connections: set[Connection] = set()
        self.served = 0  # connections not refused
        self.tasks: set[asyncio.Task[None]] = set()  # connections' app workers, until each ends
        self.date = b""  # the `date` header line, renewed every second by the sweeper
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._emptied: asyncio.Event | None = None  # set when the last connection closes
        self._heads: list[Exchange] = []  # answers' heads waiting for the end of this pass
        self._stamp()

    def flush_soon(self, exchange: Exchange) -> None:
        """Write `exchange`'s head at the end of this pass of the loop unless its first body
        part takes it along first: one callback per pass for every answer begun in it (a
        plain answer's body follows at once, and its head never waits)."""
        if not self._heads:
            exchange.conn.loop.call_soon(self._flush_heads)
        self._heads.append(exchange)

    def _flush_heads(self) -> None:
        heads, self._heads = self._heads, []
        for exchange in heads:
            exchange.flush_head()

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
            if self.connections or self.tasks:
                self._emptied = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._emptied.wait(), self.graceful)
        finally:  # also when the daemon stops waiting: nothing is left serving
            for conn in list(self.connections):
                conn.abort()
            for task in list(self.tasks):
                task.cancel()
            if self._sweeper is not None:
                self._sweeper.cancel()

    def admit(self) -> bool:
        """A new connection: True when it is within `max_connections`."""
        if self.served >= self.max_connections:
            return False
        self.served += 1
        return True

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not conn.refused:
            self.served -= 1
        self._check_emptied()

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._check_emptied()

    def _check_emptied(self) -> None:
        if self._emptied is not None and not self.connections and not self.tasks:
            self._emptied.set()

    def _stamp(self) -> None:
        self.date = b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"

    async def _sweep(self) -> None:
        """Once a second: the date line; connections idle past `keep_alive` closed, those
        whose client reads nothing for `send_timeout` (or `keep_alive` once closing) cut off.
        One timer for all of them, where a timer per request would cost every request."""
        while True:
            await asyncio.sleep(1.0)
            self._stamp()
            now = time.monotonic()
            for conn in list(self.connections):
                conn.sweep(now)
