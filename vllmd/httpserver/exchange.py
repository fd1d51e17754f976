"""One request and its answer on a connection of `vllmd.httpserver.server`: the ASGI `receive` and
`send` the app is given, the answer's head and body framing, and the server's extension for
hearing of a client that left (ON_DISCONNECT)."""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllmd.httpserver.asgi import Message, Scope

if TYPE_CHECKING:
    from vllmd.httpserver.connection import Connection

READ_HIGH = 256 * 1024  # body bytes buffered for the app before reading pauses
STATUS_LINES = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
DISCONNECT: Message = {"type": "http.disconnect"}
# A scope extension: `scope["extensions"][ON_DISCONNECT](callback)` has `callback()` called
# when the client leaves before the answer is complete (at once if it has left already);
# `(None)` forgets it. What a watcher task blocked in receive() would learn, without a task.
ON_DISCONNECT = "vllmd.on_disconnect"
# A scope extension's key, True where receive() takes a timeout: `await receive(seconds)` raises
# TimeoutError when it waits that long for more of the request's body (a deadline between
# reads, nginx's client_body_timeout), without a timer for a body that is in already.
RECEIVE_TIMEOUT = "vllmd.receive_timeout"
NO_EXTENSIONS: dict[str, Any] = {}


class Exchange:
    """One request and its answer: the ASGI `receive` and `send` of the app."""

    __slots__ = (
        "body",
        "buffered",
        "chunked",
        "complete",
        "conn",
        "done",
        "expect_continue",
        "head",
        "head_only",
        "keep_alive",
        "left",
        "scope",
        "started",
        "waiter",
    )

    def __init__(
        self, conn: Connection, scope: Scope, keep_alive: bool, head_only: bool, expect: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.head_only = head_only  # HEAD: the answer's head, never its body
        self.body: list[bytes] = []
        self.buffered = 0
        self.complete = False  # the whole request body is in `body` or was handed over
        self.expect_continue = expect  # `Expect: 100-continue`: the client waits for a go
        self.started = False
        self.done = False  # the answer is complete (or was given up)
        self.chunked = False
        self.head = b""  # the answer's head, not written yet
        self.waiter: asyncio.Future[None] | None = None
        self.left: Callable[[], object] | None = None  # the app's ON_DISCONNECT callback

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def feed(self, body: bytes) -> int:
        """Body bytes arrived; returns how many wait for the app."""
        self.body.append(body)
        self.buffered += len(body)
        self.wake()
        return self.buffered

    def end_body(self) -> None:
        self.complete = True
        self.wake()

    def body_follows(self) -> None:
        """The parser ended the request at its head (it asked for an upgrade), but a body
        follows: read it after all (before the app has looked: within the same read)."""
        self.complete = False

    def abandon(self) -> None:
        """The server answered this request itself (or gave up on it)."""
        self.done = True
        self.wake()

    def on_disconnect(self, callback: Callable[[], object] | None) -> None:
        self.left = callback
        if callback is not None and self.conn.lost and not self.done:
            callback()

    def gone(self) -> None:
        """The client left while this exchange was in hand."""
        self.wake()
        if self.left is not None and not self.done:
            callback, self.left = self.left, None
            callback()

    async def receive(self, timeout: float | None = None) -> Message:
        conn = self.conn
        if self.buffered >= 0:  # some of the body is still to be handed over
            while not (self.body or self.complete):
                if conn.lost or self.done:
                    return DISCONNECT
                if self.expect_continue:
                    self.expect_continue = False
                    if not self.started:  # else the final answer went already
                        conn.write(CONTINUE)
                if timeout is None:
                    await self._wait()
                else:
                    async with asyncio.timeout(timeout):
                        await self._wait()
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.body = []
            if self.buffered > READ_HIGH:
                conn.resume_reading()
            more = not self.complete
            self.buffered = 0 if more else -1  # -1: the whole body was handed over
            return {"type": "http.request", "body": body, "more_body": more}
        # What is left to hear of is the client leaving (or the answer ending, after which
        # the request is over for the app too).
        while not (conn.lost or self.done):
            await self._wait()
        return DISCONNECT

    async def _wait(self) -> None:
        # One future for every task waiting in receive(), each woken by wake(); shielded, so
        # one of them cancelled does not cancel the others' wait.
        if self.waiter is None or self.waiter.done():
            self.waiter = self.conn.loop.create_future()
        await asyncio.shield(self.waiter)

    async def send(self, message: Message) -> None:
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("the answer was started already")
            self.head = self._head(message["status"], message.get("headers", ()))
            self.started = True
            # Written with the first body part, or at the end of this pass of the loop.
            conn.server.flush_soon(self)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started or self.done:
            raise RuntimeError("body outside an answer")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.head_only:
            body = b""
        elif self.chunked:
            if body:
                body = b"%x\r\n%s\r\n" % (len(body), body)
            if not more:
                body += b"0\r\n\r\n"
        if self.head:
            body = self.head + body
            self.head = b""
        if body:
            conn.write(body)
        if not more:
            self.done = True
            conn.finished(self)
        elif conn.paused:
            await conn.drain()
        elif conn.lost:
            await asyncio.sleep(0)  # an app that only sends must not starve the loop

    def flush_head(self) -> None:
        if self.head:
            self.conn.write(self.head)
            self.head = b""

    def _head(self, status: int, headers: Any) -> bytes:
        line = STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
        parts = [line, self.conn.server.date]
        lines = 2  # the head's lines so far: each must end in its only line break
        length = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = True
            elif lower == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue  # the server's to say, below
            elif lower == b"transfer-encoding":
                continue  # the server frames the body itself
            parts += (name, b": ", value, b"\r\n")
            lines += 1
        if not length and not self.head_only and status >= 200 and status not in (204, 304):
            if self.scope["http_version"] == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
                lines += 1
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads to the close
        if not self.complete:
            # Answered before the whole body came (a 413, a 408, a 401 before a 100-continue
            # body): the connection closes with the answer rather than read the rest only to
            # throw it away (and after a 100-continue the client may send the body or skip it
            # for its next request: neither can be told apart).
            self.keep_alive = False
        if not self.keep_alive or self.conn.closing:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
            lines += 1
        elif self.scope["http_version"] == "1.0":
            parts.append(b"connection: keep-alive\r\n")
            lines += 1
        parts.append(b"\r\n")
        lines += 1
        head = b"".join(parts)
        # A header with a line break of its own would add a line: counted in C, once.
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise RuntimeError("a header name or value with a line break")
        return head
