"""The gateway's keep-alive client to an engine (vllmd.engine.upstream), against a small raw
HTTP/1.1 server on a Unix socket whose every answer the test scripts."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from vllmd.engine.answers import ConnectError, ReadError
from vllmd.engine.upstream import Pool

pytestmark = pytest.mark.anyio

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Engine:
    """Accepts connections and answers each request with `answer` (False: close)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.answer(reader, writer, request):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


@asynccontextmanager
async def engine(tmp_path: Path, answer: Answer) -> AsyncIterator[tuple[Engine, Pool]]:
    fake = Engine(answer)
    path = tmp_path / "engine.sock"
    server = await asyncio.start_unix_server(fake.serve, path=str(path))
    pool = Pool(uds=path, connect_timeout=1.0, auth=b"Bearer k")
    try:
        yield fake, pool
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
    writer.write(OK)
    await writer.drain()
    return True


async def test_a_request_goes_out_whole_with_the_engine_key_and_an_exact_length(
    tmp_path: Path,
) -> None:
    async with engine(tmp_path, ok) as (fake, pool):
        response = await pool.post("/v1/completions", b'{"a": 1}', [(b"x-custom", b"kept")])
        assert (response.status_code, await response.aread()) == (200, b"{}")
        await response.aclose()
    assert fake.requests == [
        b"POST /v1/completions HTTP/1.1\r\nhost: engine\r\nauthorization: Bearer k\r\n"
        b'content-length: 8\r\nx-custom: kept\r\n\r\n{"a": 1}'
    ]
    assert response.content_type() == b"application/json"


async def test_connections_are_kept_alive_and_reused(tmp_path: Path) -> None:
    async with engine(tmp_path, ok) as (fake, pool):
        for _ in range(5):
            response = await pool.post("/v1/completions", b"{}", [])
            await response.aread()
            await response.aclose()
    assert (fake.connections, len(fake.requests)) == (1, 5)


async def test_a_connection_the_engine_closed_is_not_reused(tmp_path: Path) -> None:
    async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> bool:
        w.write(OK[: OK.index(b"\r\n\r\n")] + b"\r\nconnection: close\r\n\r\n{}")
        await w.drain()
        return False

    async with engine(tmp_path, once) as (fake, pool):
        for _ in range(3):
            response = await pool.post("/v1/completions", b"{}", [])
            assert await response.aread() == b"{}"
            await response.aclose()
    assert fake.connections == 3


async def test_a_stream_is_handed_over_chunk_by_chunk(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        w.write(b"transfer-encoding: chunked\r\n\r\n")
        w.write(b"9\r\ndata: 1\n\n\r\n")
        await w.drain()
        await gate.wait()
        w.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await w.drain()
        return True

    async with engine(tmp_path, stream) as (fake, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        chunks = response.aiter_raw()
        assert await chunks.__anext__() == b"data: 1\n\n"  # before the engine sent the rest
        gate.set()
        assert [c async for c in chunks] == [b"data: 2\n\n"]
        await response.aclose()
        again = await pool.post("/v1/completions", b"{}", [])
        await again.aclose()
    assert fake.connections == 1  # read to its end: kept


async def test_an_answer_left_unfinished_aborts_its_connection(tmp_path: Path) -> None:
    """What a client's disconnect does upstream: the engine sees its connection close."""

    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        w.write(b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await w.drain()
        await r.read()  # until the client goes
        return False

    async with engine(tmp_path, endless) as (fake, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        assert await response.aiter_raw().__anext__() == b"data: 1\n\n"
        await response.aclose()
        await asyncio.wait_for(fake.closed.wait(), 5)


async def test_an_answer_broken_off_is_a_read_error(tmp_path: Path) -> None:
    async def broken(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")
        await w.drain()
        return False

    async with engine(tmp_path, broken) as (_fake, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        with pytest.raises(ReadError):
            await response.aread()
        await response.aclose()


async def test_a_reused_connection_closed_as_the_request_left_is_retried_once(
    tmp_path: Path,
) -> None:
    """The keep-alive race: the engine closes an idle connection just as a request goes out
    on it, before answering anything; the request is sent again on a fresh connection."""

    async def first_then_drop(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes
    ) -> bool:
        if len(fake.requests) == 2:
            return False  # read the second request, close without a byte
        w.write(OK)
        await w.drain()
        return True

    async with engine(tmp_path, first_then_drop) as (fake, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        await response.aread()
        await response.aclose()
        response = await pool.post("/v1/completions", b"{}", [])
        assert await response.aread() == b"{}"
        await response.aclose()
    assert (fake.connections, len(fake.requests)) == (2, 3)


async def test_no_engine_is_a_connect_error(tmp_path: Path) -> None:
    pool = Pool(uds=tmp_path / "missing.sock", connect_timeout=1.0)
    with pytest.raises(ConnectError):
        await pool.post("/v1/completions", b"{}", [])


async def test_a_closed_pool_refuses_requests(tmp_path: Path) -> None:
    async with engine(tmp_path, ok) as (_fake, pool):
        pool.close()
        with pytest.raises(ConnectError):
            await pool.post("/v1/completions", b"{}", [])


async def test_a_request_the_engine_worked_on_before_dropping_it_is_not_sent_twice(
    tmp_path: Path,
) -> None:
    """Past RETRY_WINDOW the engine may have acted on the POST: the error stands."""

    async def work_then_drop(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes
    ) -> bool:
        if len(fake.requests) == 2:
            await asyncio.sleep(0.3)  # generating, then the engine goes away
            return False
        w.write(OK)
        await w.drain()
        return True

    async with engine(tmp_path, work_then_drop) as (fake, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        await response.aread()
        await response.aclose()
        with pytest.raises(ReadError):
            await pool.post("/v1/completions", b"{}", [])
    assert len(fake.requests) == 2


async def test_bytes_sent_when_no_answer_is_due_never_reach_the_next_answer(
    tmp_path: Path,
) -> None:
    """An engine that sends a stray answer after the real one (a 408 on an idle
    connection): the connection ends, the next request gets its own answer only."""
    stray = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 5\r\n\r\nstale"

    async def answer_then_stray(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes
    ) -> bool:
        w.write(OK)
        await w.drain()
        if len(fake.requests) == 1:
            await asyncio.sleep(0.05)
            w.write(stray)
            await w.drain()
        return True

    async with engine(tmp_path, answer_then_stray) as (fake, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        assert await response.aread() == b"{}"
        await response.aclose()
        await asyncio.sleep(0.2)  # the stray arrives while the connection is idle
        response = await pool.post("/v1/completions", b"{}", [])
        assert (response.status_code, await response.aread()) == (200, b"{}")
        await response.aclose()
    assert fake.connections == 2


async def test_a_stray_answer_in_the_same_read_does_not_change_this_one(tmp_path: Path) -> None:
    async def two_at_once(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> bool:
        w.write(OK + b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nx-stray: 1\r\n\r\n")
        await w.drain()
        return True

    async with engine(tmp_path, two_at_once) as (_fake, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        assert (response.status_code, await response.aread()) == (200, b"{}")
        assert (b"x-stray", b"1") not in response.headers
        await response.aclose()


async def test_a_connection_the_engine_closed_is_freed_without_the_cycle_collector(
    tmp_path: Path,
) -> None:
    """Regression (make soak): each lost connection stayed in a cycle with its parser until
    the collector's rare full passes freed it."""

    async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> bool:
        w.write(OK[: OK.index(b"\r\n\r\n")] + b"\r\nconnection: close\r\n\r\n{}")
        await w.drain()
        return False

    gc.collect()
    gc.disable()
    try:
        async with engine(tmp_path, once) as (fake, pool):
            refs = []
            for _ in range(10):
                response = await pool.post("/v1/completions", b"{}", [])
                assert await response.aread() == b"{}"
                await response.aclose()
                refs.append(weakref.ref(response._conn))
                del response
            for _ in range(10):
                await asyncio.sleep(0)
            alive = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    assert fake.connections == 10 and alive == 0
