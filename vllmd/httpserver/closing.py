"""Two stand-ins for a connection (vllmd.httpserver.connection) near its end.

`BodyOnly`: past a request that asked for an upgrade. httptools ends such a request at its
head and takes what follows for another protocol; the connection serves it as plain HTTP/1.1
with its body instead, by feeding a new parser a made-up head of the request's own framing
headers, then the rest. This hears that parser: the body goes to the connection, the made-up
head and anything after the body to no one. The connection closes after that request: a
proxy in front that took it for a tunnel's start must keep no tunnel to vllmd open.

`Lingering`: the transport's protocol once an answer went out before its request's body was
all in and the write side is shut: what the client still sends is dropped, up to LINGER_BYTES
or LINGER seconds, then the connection closes (nginx's lingering close).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllmd.httpserver.connection import Connection

LINGER = 2.0  # seconds the client's remaining bytes are read and dropped after the answer
LINGER_BYTES = 8 * 1024 * 1024  # and at most this many


def body_framing(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The header lines that frame a request's body (lower-case names, as parsed): the
    made-up head's, before the body of a request that asked for an upgrade."""
    return b"".join(
        b"%s: %s\r\n" % (name, value)
        for name, value in headers
        if name in (b"content-length", b"transfer-encoding")
    )


class BodyOnly:
    """httptools' callbacks for the body of a request that asked for an upgrade."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.done = False  # the body is in: nothing more is heard

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.conn.on_body(body)

    def on_message_complete(self) -> None:
        if not self.done:
            self.done = True
            self.conn.end_upgraded_body()


def linger(conn: Connection, transport: asyncio.Transport) -> bool:
    """Close after an answer sent before its request's body was all in. Closing a socket
    with unread bytes resets it, which can discard the answer still on its way: the write
    side is shut instead (the client reads the answer, then the end), and what it still sends
    is dropped for a moment (`Lingering`). False where that cannot be done: close it."""
    if transport.is_closing() or not transport.can_write_eof():
        return False
    transport.set_protocol(Lingering(conn, transport))
    transport.write_eof()
    return True


class Lingering(asyncio.Protocol):
    """Drops what a client still sends after its answer, for a bounded time and size."""

    def __init__(self, conn: Connection, transport: asyncio.Transport) -> None:
        self.conn = conn
        self.transport = transport
        self.left = LINGER_BYTES
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # the client is done too: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.conn.connection_lost(exc)
