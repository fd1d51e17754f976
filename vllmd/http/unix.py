"""The control listener: HTTP/1.1 on a Unix socket, with each connection's peer credentials.

uvicorn's ASGI scope does not carry the connection's socket, and SO_PEERCRED needs it, so the
control API has its own small server: anyio's listener, h11 for the protocol (the parser httpx
already brings). It binds the socket itself (mode and group set before anyone can connect; a
stale file removed, a live one refused), takes over no signals, and cuts off what a local
client must not do to the daemon: a request over `max_request` bytes, one whose head and body
take longer than `request_timeout`, connections beyond `max_connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import h11
import structlog
from anyio.abc import SocketStream, TaskStatus

from vllmd.errors import ListenFailed

log = structlog.get_logger("vllmd.control")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
ACCEPT_RETRY = 0.5  # after accept() failed for want of file descriptors
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED, read when it connected)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    segments: tuple[str, ...]  # the path's segments, each percent-decoded; no query
    query: dict[str, str]
    body: bytes
    peer: Peer


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Streamed:
    """A response sent as it is produced (NDJSON lines); it ends when `chunks` ends or the
    client leaves."""

    chunks: AsyncIterator[bytes]
    status: int = 200
    content_type: str = "application/x-ndjson"


Handler = Callable[[Request], Awaitable[Reply | Streamed]]
# What a request that breaks the protocol's limits gets: (status, body) built by the API.
Refusal = Callable[[int, str, str], Reply]


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def bind_unix(
    path: Path, mode: int, group: str = "", key: str = "daemon.control_socket"
) -> socket.socket:
    """A listening Unix socket at `path` with file mode `mode` and group `group` from its
    first moment (bound under a umask that lets nobody in, then opened up). A stale socket
    file is removed; one that another process answers on is ListenFailed naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        gid = grp.getgrnam(group).gr_gid if group else -1
    except (OSError, KeyError) as exc:
        raise ListenFailed(f"cannot create the control socket {path} ({key}): {exc}") from None
    _remove_stale(path, key)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(MAX_CONNECTIONS)
    except OSError as exc:
        sock.close()
        raise ListenFailed(f"cannot listen on the control socket {path} ({key}): {exc}") from None
    return sock


def _remove_stale(path: Path, key: str) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenFailed(f"{path} ({key}) exists and is not a socket: remove it or change {key}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # nobody listens: left by a daemon that died
        return
    except OSError as exc:
        # Busy (a full backlog), not permitted, ...: someone may be there; never remove it.
        raise ListenFailed(
            f"cannot tell whether the control socket {path} ({key}) is in use: {exc}"
        ) from None
    finally:
        probe.close()
    raise ListenFailed(
        f"another process answers on the control socket {path} ({key}): is vllmd running already?"
    )


class UnixServer:
    def __init__(
        self,
        handler: Handler,
        refuse: Refusal,
        *,
        max_request: int = MAX_REQUEST,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._handler = handler
        self._refuse = refuse
        self._max_request = max_request
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._connections = 0

    async def serve(
        self, sock: socket.socket, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections on `sock` (a bound, listening Unix socket) until cancelled.

        Connections are accepted with the loop's own `sock_accept` and wrapped as transport
        streams: anyio's Unix-socket streams wait on raw readers, which race a cancellation
        (a reader firing on a cancelled future) when the daemon stops under open connections.
        """
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        with sock:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    try:
                        client, _ = await loop.sock_accept(sock)
                    except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait for a free one
                        log.warning("control_accept_failed", error=str(exc))
                        await anyio.sleep(ACCEPT_RETRY)
                        continue
                    if self._connections >= self._max_connections:
                        client.close()  # over the limit: cut off at once
                        continue
                    self._connections += 1
                    tg.start_soon(self._connection, client)

    async def _connection(self, client: socket.socket) -> None:
        try:
            peer = peer_of(client)
            stream = await SocketStream.from_socket(client)
        except OSError:
            client.close()
            self._connections -= 1
            return
        try:
            async with stream:
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_request)
                while await self._one_request(stream, conn, peer):
                    conn.start_next_cycle()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client left
        except (OSError, TimeoutError) as exc:
            log.debug("control_connection_error", error=str(exc))
        except Exception:
            # A bug must cost one connection, never the daemon (this task group is its).
            log.exception("control_connection_failed")
        finally:
            self._connections -= 1

    async def _one_request(self, stream: SocketStream, conn: h11.Connection, peer: Peer) -> bool:
        """Read one request, answer it; whether the connection stays open for another. Each
        request (head and body) must arrive within request_timeout of the connection's start
        or the previous answer: a silent client does not keep a slot."""
        idle = True
        try:
            with anyio.fail_after(self._request_timeout):
                if not conn.trailing_data[0]:
                    conn.receive_data(await _receive(stream))
                idle = False
                event = await _next_event(stream, conn)
                if isinstance(event, h11.ConnectionClosed):
                    return False
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
                    await _send_reply(stream, conn, reply, close=True)
            return False
        except _TooLarge:
            reply = self._refuse(
                413, "body_too_large", f"requests are at most {self._max_request} bytes"
            )
            await _send_reply(stream, conn, reply, close=True)
            return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                code = "body_too_large" if status == 431 else "bad_request"
                reply = self._refuse(
                    413 if status == 431 else 400, code, f"malformed HTTP request: {exc}"
                )
                with contextlib.suppress(Exception):
                    await _send_reply(stream, conn, reply, close=True)
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
            await _send_streamed(stream, conn, response, self._request_timeout)
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
    stream: SocketStream, conn: h11.Connection, response: Streamed, write_timeout: float
) -> None:
    """Send `response` chunk by chunk until it ends or the client leaves (seen by reading:
    a follower may wait a long time between lines)."""
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
                if chunk:
                    with anyio.fail_after(write_timeout):  # a follower that stopped reading
                        await stream.send(conn.send(h11.Data(data=chunk)) or b"")
            await stream.send(conn.send(h11.EndOfMessage()) or b"")
        except anyio.get_cancelled_exc_class():
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
