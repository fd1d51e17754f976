"""One connection of the control listener (`listener.py`): HTTP/1.1 through h11, requests read
within the listener's limits, replies whole or streamed.

Imported at the first connection, not with the listener: h11 is needed only once a client
comes.
"""

from __future__ import annotations

import contextlib
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import h11
import structlog
from anyio.abc import SocketAttribute, SocketStream

from vllmd.control.listener import Handler, Peer, Refusal, Reply, Request, Streamed
from vllmd.control.slots import Slot, unread_bytes

log = structlog.get_logger("vllmd.control")


class ControlConnection:
    def __init__(
        self,
        handler: Handler,
        refuse: Refusal,
        max_request: int,
        request_timeout: float,
        stall_timeout: float,
    ) -> None:
        self._handler = handler
        self._refuse = refuse
        self._max_request = max_request
        self._request_timeout = request_timeout
        self._stall_timeout = stall_timeout

    async def run(self, stream: SocketStream, peer: Peer, slot: Slot) -> None:
        """Answer requests until the client leaves or a request ends the connection; `slot`
        is told when the connection is idle, busy or streaming."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_request)
        while await self._one_request(stream, conn, peer, slot):
            conn.start_next_cycle()

    async def _one_request(
        self, stream: SocketStream, conn: h11.Connection, peer: Peer, slot: Slot
    ) -> bool:
        """Read one request, answer it; whether the connection stays open for another. Each
        request (head and body) must arrive within request_timeout of the connection's start
        or the previous answer: a silent client does not keep a slot."""
        idle = True
        head = False  # a HEAD request: its answer has no body, refusals included
        try:
            with anyio.fail_after(self._request_timeout):
                if not conn.trailing_data[0]:
                    slot.idle()  # until its first bytes: another connection may take the slot
                    conn.receive_data(await _receive(stream))
                idle = False
                slot.busy()
                event = await _next_event(stream, conn)
                if isinstance(event, h11.ConnectionClosed):
                    return False
                head = isinstance(event, h11.Request) and event.method == b"HEAD"
                request = await self._read_request(stream, conn, event, peer)
        except TimeoutError:
            if not idle and conn.our_state is h11.SEND_RESPONSE:
                # Too slow: said in one line, then cut off.
                with contextlib.suppress(Exception):
                    reply = self._refuse(
                        408,
                        "bad_request",
                        f"request not received within {self._request_timeout:g} s",
                    )
                    await _send_reply(stream, conn, reply, close=True, head_only=head)
            return False
        except _TooLarge:
            reply = self._refuse(
                413, "body_too_large", f"requests are at most {self._max_request} bytes"
            )
            await _send_reply(stream, conn, reply, close=True, head_only=head)
            return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                code = "body_too_large" if status == 431 else "bad_request"
                reply = self._refuse(
                    413 if status == 431 else 400, code, f"malformed HTTP request: {exc}"
                )
                with contextlib.suppress(Exception):
                    await _send_reply(stream, conn, reply, close=True, head_only=head)
            return False

        try:
            response = await self._handler(request)
        except Exception:
            log.exception("control_request_failed", method=request.method)
            response = self._refuse(500, "internal_error", "the request failed: see the log")
        # A client that does not read its answer must not hold its slot forever.
        if isinstance(response, Reply):
            with anyio.fail_after(self._request_timeout):
                await _send_reply(
                    stream, conn, response, close=False, head_only=request.method == "HEAD"
                )
        else:
            await _send_streamed(stream, conn, response, slot, self._stall_timeout)
            return False
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_request(
        self, stream: SocketStream, conn: h11.Connection, head: h11.Event, peer: Peer
    ) -> Request:
        if not isinstance(head, h11.Request):
            raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
        size = len(head.target) + sum(len(n) + len(v) + 4 for n, v in head.headers)
        if size > self._max_request:
            raise _TooLarge()
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self._max_request - size:
                raise _TooLarge()
        body = bytearray()
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) + size > self._max_request:
                    raise _TooLarge()
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError("incomplete request", error_status_hint=400)
        target = urlsplit(head.target.decode("ascii", "replace"))
        return Request(
            method=head.method.decode("ascii", "replace"),
            segments=tuple(unquote(part) for part in target.path.strip("/").split("/")),
            query=dict(parse_qsl(target.query)),
            body=bytes(body),
            peer=peer,
        )


class _TooLarge(Exception):
    pass


async def _receive(stream: SocketStream) -> bytes:
    """The next bytes from the client; b"" once it has closed its end."""
    try:
        return await stream.receive(65536)
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return b""


async def _next_event(stream: SocketStream, conn: h11.Connection) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await _receive(stream))
            continue
        assert not isinstance(event, type)  # PAUSED: only after a complete request
        return event


async def _send_reply(
    stream: SocketStream,
    conn: h11.Connection,
    reply: Reply,
    *,
    close: bool,
    head_only: bool = False,
) -> None:
    headers = [
        ("content-type", reply.content_type),
        *reply.headers,
        ("content-length", str(len(reply.body))),
    ]
    if close:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
    if not head_only:  # a HEAD answer has the headers of the GET, no body
        data = (data or b"") + (conn.send(h11.Data(data=reply.body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send(data)


async def _send_streamed(
    stream: SocketStream,
    conn: h11.Connection,
    response: Streamed,
    slot: Slot,
    stall_timeout: float,
) -> None:
    """Send `response` chunk by chunk until it ends or the client leaves (seen by reading:
    a follower may wait a long time between lines). A client that reads nothing of it for
    `stall_timeout` (a send blocked that long, or nothing of what waits read) is cut off,
    without the chunked end: it can tell the answer was not whole."""
    raw = stream.extra(SocketAttribute.raw_socket)
    slot.streaming(lambda: unread_bytes(raw))
    head = conn.send(
        h11.Response(
            status_code=response.status,
            headers=[("content-type", response.content_type), ("connection", "close")],
        )
    )
    await stream.send(head or b"")
    async with anyio.create_task_group() as tg:

        async def client_leaves() -> None:
            with contextlib.suppress(Exception):
                while await stream.receive(4096):
                    pass
            tg.cancel_scope.cancel()

        tg.start_soon(client_leaves)
        try:
            async for chunk in response.chunks:
                if not chunk:
                    continue
                if slot.stalled_for() >= stall_timeout:
                    raise TimeoutError(f"the client read nothing for {stall_timeout:g} s")
                with anyio.fail_after(stall_timeout):  # a follower that stopped reading
                    await stream.send(conn.send(h11.Data(data=chunk)) or b"")
                slot.sent()
            await stream.send(conn.send(h11.EndOfMessage()) or b"")
        except anyio.get_cancelled_exc_class():
            if slot.evicted:  # stalled, and its slot taken: cut off, no clean end
                raise
            # The daemon is stopping: end the stream properly (a follower can tell a clean
            # end from a broken connection), then go.
            # (or the client has left already)
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(1.0),
                contextlib.suppress(Exception),
            ):
                await stream.send(conn.send(h11.EndOfMessage()) or b"")
            raise
        finally:
            with contextlib.suppress(Exception):
                await response.chunks.aclose()  # type: ignore[attr-defined]
        tg.cancel_scope.cancel()
