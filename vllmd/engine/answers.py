"""What the proxy knows of an engine's answer, whichever client fetched it: the errors, named
as httpx names them, and the `UpstreamResponse` protocol (vllmd.engine.upstream's pool and
the tests' httpx path both give one)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol


class UpstreamError(Exception):
    """The engine could not be reached, or broke off or garbled its answer."""


class ConnectError(UpstreamError):
    """No connection to the engine."""


class ConnectTimeout(ConnectError):
    """No connection to the engine in time."""


class ReadError(UpstreamError):
    """The connection failed or closed before the answer ended."""


class RemoteProtocolError(UpstreamError):
    """The engine's answer is not HTTP/1.1 as the proxy speaks it."""


class UpstreamResponse(Protocol):
    """An engine's answer with its body still to come: the part of `httpx.Response` the
    proxy uses (`headers` raw, as the engine sent them)."""

    status_code: int
    headers: list[tuple[bytes, bytes]]

    def content_type(self) -> bytes: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aread(self) -> bytes: ...
    async def abuffer(self, limit: int) -> tuple[bytes, bool]:
        """The body whole, (body, True), when it ends within `limit` bytes; else as soon as
        more than `limit` arrived, (that much, False): the rest comes from `aiter_raw()`."""
        ...

    async def aclose(self) -> None: ...


def content_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value
    return b""


UNBOUNDED = 1 << 62


async def buffer(
    next_chunk: Callable[[], Awaitable[bytes | None]], limit: int
) -> tuple[bytes, bool]:
    """`UpstreamResponse.abuffer` over `next_chunk()` (None at the end of the body)."""
    chunks = []
    size = 0
    while (data := await next_chunk()) is not None:
        chunks.append(data)
        size += len(data)
        if size > limit:
            return b"".join(chunks), False
    return chunks[0] if len(chunks) == 1 else b"".join(chunks), True


class Source(Protocol):
    """Where a pooled answer's body comes from: one of the pool's connections."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def whole(self) -> bytes | None: ...
    async def chunk(self) -> bytes | None: ...
    def release(self) -> None: ...


class Response:
    """An answer on one of vllmd.engine.upstream's pooled connections."""

    __slots__ = ("_conn", "_done", "headers", "status_code")

    def __init__(self, conn: Source) -> None:
        self._conn = conn
        self._done = False
        self.status_code = conn.status
        self.headers = conn.headers  # raw (name, value) pairs as the engine sent them

    def content_type(self) -> bytes:
        return content_type(self.headers)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while (data := await self._conn.chunk()) is not None:
            yield data

    async def aread(self) -> bytes:
        return (await self.abuffer(UNBOUNDED))[0]

    async def abuffer(self, limit: int) -> tuple[bytes, bool]:
        conn = self._conn
        data = conn.whole()  # no wait for an answer read whole already (at most HIGH_WATER)
        if data is not None:
            return data, True
        return await buffer(conn.chunk, limit)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Synchronous, so a cancelled caller still closes: an unfinished answer's connection
        is aborted (the engine sees the client leave and stops generating). Once only."""
        if not self._done:
            self._done = True
            self._conn.release()
