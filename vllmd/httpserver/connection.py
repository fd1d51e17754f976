"""One client connection of `vllmd.httpserver.server`: its bytes parsed by httptools, its requests
answered in order (each an `Exchange`), its flow control both ways, and the server's own plain
answers (400, 431, 500, 503)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools
import structlog

from vllmd.httpserver.closing import BodyOnly, body_framing, linger
from vllmd.httpserver.exchange import (
    ON_DISCONNECT,
    READ_HIGH,
    RECEIVE_TIMEOUT,
    Exchange,
)
from vllmd.httpserver.plain import BAD_REQUEST, HEAD_TOO_LARGE, INTERNAL_ERROR, UNAVAILABLE

if TYPE_CHECKING:
    from vllmd.httpserver.server import Server

log = structlog.get_logger("vllmd.http")


class Connection(asyncio.Protocol):
    """One client connection: parses its requests and runs the app for each, in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.scope_base: dict[str, Any] = {}
        self.idle_since: float | None = time.monotonic()  # None while a request is in hand
        self.lost = False
        self.refused = False
        self.closing = False  # no more requests: answer the one in hand, then close
        self.closed_at: float | None = None  # close() asked, the buffer still flushing
        self.paused = False  # the transport's write buffer is full
        self.paused_at = 0.0
        self.reading = True
        self.deferred = False  # an answer ended while paused: what follows waits for a drain
        self.drained: asyncio.Future[None] | None = None
        self.parsing: Exchange | None = None  # the request whose bytes are being parsed
        self.current: Exchange | None = None  # the request the app is answering
        self.worker: asyncio.Task[None] | None = None  # runs the app for each request
        self.next_up: Exchange | None = None  # begun while the worker was still busy
        self.idle: asyncio.Future[None] | None = None  # the worker waits for a request
        self.queue: deque[Exchange] = deque()  # pipelined requests after `current`
        # Every request's, one dict.
        self.extensions: dict[str, Any] = {ON_DISCONNECT: self.on_disconnect, RECEIVE_TIMEOUT: True}
        self._in_head = False
        self._begun = 0  # requests whose parsing began
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0  # the head's parsed parts
        self._head_bytes = 0  # bytes received while a head was unfinished
        self._expect = False

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
            "extensions": self.extensions,
        }
        # Over the limit: every request on this connection gets a 503, then it closes.
        self.refused = not self.server.admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.forget(self)
        self.queue.clear()
        if self.current is not None:
            self.current.gone()
        if self.idle is not None and not self.idle.done():
            self.idle.set_result(None)  # the worker ends
        self._drained()
        if self.worker is None:
            self._release()

    def _release(self) -> None:
        """Lost, and no app runs for it: let go of what refers back to it (the parser, the
        extensions, the transport, its last request), so it is freed at once, not by the
        cycle collector's rare full passes (the daemon's RSS grew: bench/rss_bursts.py)."""
        del self.parser
        self.extensions.clear()
        self.transport = None
        self.parsing = self.current = self.next_up = None

    def data_received(self, data: bytes) -> None:
        begun = self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._past_upgrade(data, exc.args[0])
            return
        except httptools.HttpParserError:
            self._unparsable()
            return
        # A head begun in an earlier packet and still unfinished (httptools holds its bytes,
        # a header value that never ends included) is bounded too. A packet in which a head
        # begins is not counted: it may hold earlier requests and bodies whole.
        if self._in_head and self._begun == begun:
            self._head_bytes += len(data)
            if self._head_bytes > self.server.max_head:
                self._malformed(HEAD_TOO_LARGE)

    def _unparsable(self) -> None:
        self._malformed(BAD_REQUEST if self._head_size <= self.server.max_head else HEAD_TOO_LARGE)

    def _past_upgrade(self, data: bytes, offset: int) -> None:
        """A request asked for an upgrade (h2c, a websocket: neither is served): httptools took
        `data[offset:]` for another protocol. It is served as plain HTTP/1.1 with its body,
        then the connection closes (vllmd.httpserver.closing says how and why)."""
        self.closing = True
        exchange = self.parsing
        framing = body_framing(self._headers)
        if not framing or exchange is None:
            self._pause_reading()
            return
        exchange.body_follows()
        self.parser = httptools.HttpRequestParser(BodyOnly(self))
        try:
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + data[offset:])
        except httptools.HttpParserUpgrade:
            pass  # a request pipelined behind the body asked for one too: not read
        except httptools.HttpParserError:
            self._unparsable()

    def end_upgraded_body(self) -> None:
        """The body of a request that asked for an upgrade is in (`BodyOnly`)."""
        self.on_message_complete()
        self._pause_reading()

    def eof_received(self) -> bool | None:
        return None  # the transport closes: the client will send nothing more

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_at = time.monotonic()

    def resume_writing(self) -> None:
        self.paused = False
        self._drained()
        if self.deferred:
            self.deferred = False
            self._next()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_bytes = 0
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4  # ": " and the line break
        if self._head_size > self.server.max_head:
            raise httptools.HttpParserError("request head too large")
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect = True

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.server.max_head:
            raise httptools.HttpParserError("request head too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
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
        keep_alive = parser.should_keep_alive()
        exchange = Exchange(self, scope, keep_alive, method == "HEAD", self._expect)
        self.parsing = exchange
        self.idle_since = None
        if self.current is None and not self.deferred:
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
        if self.worker is None:
            self.worker = self.loop.create_task(self._work(exchange))
            self.server.track(self.worker)
            return
        self.next_up = exchange
        if self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    async def _work(self, exchange: Exchange) -> None:
        """Runs the app for each request of this connection in turn: one task for the
        connection, not one per request (a task's creation, registration and end are a
        large share of a request: docs/performance.md). An app's context variables are the
        connection's, then; the daemon's apps set none. A request begun while the app still
        runs for the one before (pipelined, its answer complete) waits for that app."""
        try:
            while True:
                await self._run(exchange)
                while self.next_up is None:
                    if self.lost:
                        return
                    self.idle = self.loop.create_future()
                    await self.idle
                exchange, self.next_up = self.next_up, None
        finally:
            self.worker = self.idle = None
            if self.next_up is not None and not self.lost:
                self.abort()  # (the server's shutdown) a request begun that no app will answer
            if self.lost:
                self._release()

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self.server.app(exchange.scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            if not exchange.done:
                self.abort()
            worker = self.worker
            if worker is None or worker.cancelling():
                raise  # the worker itself is cancelled: the server's shutdown
            # The app's own cancellation (a future it awaited was cancelled): this request
            # ends with it, as its own task would have; the connection's next ones go on.
            log.warning("app_cancelled", path=exchange.scope["path"])
            return
        except Exception:
            log.exception("app_failed", path=exchange.scope["path"])
        if exchange.done:
            return
        if exchange.started:
            self.abort()  # the answer was cut short: the client must not take it as whole
        else:
            self._refuse(INTERNAL_ERROR)

    def on_disconnect(self, callback: Callable[[], object] | None) -> None:
        """ON_DISCONNECT, for the request in hand (the only one whose app runs)."""
        if self.current is not None:
            self.current.on_disconnect(callback)

    def finished(self, exchange: Exchange) -> None:
        """`exchange`'s answer is all written: the next request, or idle, or close."""
        exchange.wake()  # its app may still wait in receive(): that is a disconnect now
        self.current = None
        if not exchange.keep_alive or self.closing:
            if exchange.complete:
                self.close()
            else:
                self._linger()
        elif self.paused:  # the client reads slower than it asks: nothing more till it reads
            self.deferred = True
        else:
            self._next()

    def _next(self) -> None:
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
                self.drained = self.loop.create_future()
            await asyncio.shield(self.drained)

    def _drained(self) -> None:
        if self.drained is not None:
            if not self.drained.done():
                self.drained.set_result(None)
            self.drained = None

    def _pause_reading(self) -> None:
        if self.reading and self.transport is not None and not self.lost:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and self.transport is not None and not self.lost:
            self.reading = True
            self.transport.resume_reading()

    def _malformed(self, answer: bytes) -> None:
        """The client sent what cannot be parsed: nothing more is read from it."""
        self.queue.clear()
        if self.current is None or not self.current.complete:
            # Nothing in hand, or a request whose own body broke off: the app hears of a
            # disconnect, the client gets the plain error answer.
            self._refuse(answer)
        elif self.current.started:
            self.abort()  # never an error answer in the middle of another
        else:
            self.closing = True  # the request in hand is answered, then the connection closes
            self._pause_reading()

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

    def sweep(self, now: float) -> None:
        """The sweeper's pass: idle too long, or a client that reads nothing."""
        keep_alive = self.server.keep_alive
        if self.closed_at is not None:
            if now - self.closed_at > keep_alive:
                self.abort()  # closing, but the client never takes the rest
        elif self.idle_since is not None and now - self.idle_since > keep_alive:
            self.close()
        elif self.paused and now - self.paused_at > self.server.send_timeout:
            log.info("client_too_slow", client=self.scope_base.get("client"))
            self.abort()  # the request in hand hears of it as a disconnect

    def _linger(self) -> None:
        """Close after an answer sent before its request's body was all in (`linger`)."""
        if self.transport is None or not linger(self, self.transport):
            self.close()
            return
        self.closed_at = time.monotonic()  # (the sweeper's backstop: aborted after keep_alive)
        self.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.closed_at = time.monotonic()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
