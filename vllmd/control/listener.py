"""The control listener: HTTP/1.1 on a Unix socket, with each connection's peer credentials.

uvicorn's ASGI scope does not carry the connection's socket, and SO_PEERCRED needs it, so the
control API has its own small server: anyio's listener, h11 for the protocol (the parser httpx
already brings; `connection.py`, loaded at the first connection). It binds the socket itself
(mode and group set before anyone can connect; a stale file removed, a live one refused), takes
over no signals, and cuts off what a local client must not do to the daemon: a request over
`max_request` bytes, one whose head and body take longer than `request_timeout`, a streamed
answer its client reads nothing of for `stall_timeout`, connections beyond `max_connections`
or a uid's share of them (`slots.py`: the oldest idle or stalled connection makes room).
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import SocketStream, TaskStatus

from vllmd.control.slots import PER_UID, RESERVED, STALL_GRACE, Slot, Slots
from vllmd.errors import ListenFailed

log = structlog.get_logger("vllmd.control")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
STALL_TIMEOUT = 30.0  # a streamed answer's client read nothing for this long: cut off
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
        stall_timeout: float = STALL_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        per_uid: int = PER_UID,
        reserved: int = RESERVED,
        stall_grace: float = STALL_GRACE,
        daemon_uid: int | None = None,
        credentials: Callable[[socket.socket], Peer] = peer_of,
    ) -> None:
        """`daemon_uid` (default: this process's) and root may use the `reserved` slots;
        `credentials` tells a connection's peer (a test's seam: SO_PEERCRED otherwise)."""
        self._handler = handler
        self._refuse = refuse
        self._max_request = max_request
        self._request_timeout = request_timeout
        self._stall_timeout = stall_timeout
        self._credentials = credentials
        uid = os.getuid() if daemon_uid is None else daemon_uid
        self.slots = Slots(
            max_connections,
            per_uid=per_uid,
            reserved=reserved,
            privileged=frozenset({0, uid}),
            stall_grace=stall_grace,
        )

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
                    try:
                        peer = self._credentials(client)
                    except OSError:
                        client.close()
                        continue
                    scope = anyio.CancelScope()
                    slot = self.slots.take(peer.uid, scope.cancel)
                    if slot is None:
                        log.debug("control_connection_refused", uid=peer.uid, pid=peer.pid)
                        client.close()  # over the limit, nobody to make room: cut off at once
                        continue
                    tg.start_soon(self._connection, client, peer, slot, scope)

    async def _connection(
        self, client: socket.socket, peer: Peer, slot: Slot, scope: anyio.CancelScope
    ) -> None:
        with scope:  # cancelled when another connection takes this one's slot
            try:
                await self._serve_one(client, peer, slot)
            finally:
                self.slots.release(slot)
        if slot.evicted:
            log.debug("control_connection_evicted", uid=peer.uid, pid=peer.pid)

    async def _serve_one(self, client: socket.socket, peer: Peer, slot: Slot) -> None:
        try:
            stream = await SocketStream.from_socket(client)
        except OSError:
            client.close()
            return
        except BaseException:  # evicted (cancelled) at once
            client.close()
            raise
        # At the first connection, not at start: h11 and the protocol's code are a share of
        # the daemon's start-up, and the control API is often not called for hours.
        try:
            from vllmd.control.connection import ControlConnection  # (its failure: one connection)

            async with stream:
                await ControlConnection(
                    self._handler,
                    self._refuse,
                    self._max_request,
                    self._request_timeout,
                    self._stall_timeout,
                ).run(stream, peer, slot)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client left
        except (OSError, TimeoutError) as exc:
            log.debug("control_connection_error", error=str(exc))
        except Exception:
            # A bug must cost one connection, never the daemon (this task group is its).
            log.exception("control_connection_failed")
