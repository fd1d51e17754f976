"""Engine answers the daemon must not hold whole: a plain answer larger than the proxy's
buffer is passed through as it arrives (memory bounded, bytes intact), and an answer head
larger than MAX_HEAD is refused (502 engine_unavailable), against a raw HTTP/1.1 engine on a
Unix socket (tests/unit/test_upstream.py's)."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.unit.test_upstream import Answer, engine
from vllmd.engine.answers import RemoteProtocolError
from vllmd.engine.upstream import MAX_HEAD
from vllmd.gateway.proxy import MAX_BUFFERED, Proxy
from vllmd.httpserver.asgi import HTTPError, Message
from vllmd.metrics import Metrics

pytestmark = pytest.mark.anyio

BLOCK = bytes(range(256)) * 256  # 64 KiB
BIG = 50 * 1024 * 1024


def _body(size: int) -> bytes:
    """What the engine sends for `size` bytes, built once (the test's own memory)."""
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


class Sink:
    """An ASGI `send` that keeps the head, a digest of the body and the size of its largest
    part, never the body."""

    def __init__(self) -> None:
        self.start: Message | None = None
        self.digest = hashlib.sha256()
        self.size = 0
        self.largest = 0
        self.ended = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        body = message.get("body", b"")
        self.digest.update(body)
        self.size += len(body)
        self.largest = max(self.largest, len(body))
        self.ended = not message.get("more_body", False)

    def header(self, name: bytes) -> list[bytes]:
        assert self.start is not None
        return [v for k, v in self.start["headers"] if k.lower() == name]


def _answerer(head: bytes, body: bytes, *, chunked: bool = False, cut: int | None = None) -> Answer:
    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> bool:
        w.write(head)
        view = memoryview(body)[:cut]
        for at in range(0, len(view), len(BLOCK)):
            part = view[at : at + len(BLOCK)]
            w.write(b"%x\r\n%s\r\n" % (len(part), bytes(part)) if chunked else part)
            await w.drain()
        if cut is not None:
            return False  # the engine dies mid-answer
        if chunked:
            w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    return answer


async def _relay(
    tmp_path: Path, head: bytes, body: bytes, *, chunked: bool = False, cut: int | None = None
) -> tuple[Sink, int, int]:
    """Relay one answer through the pool and the proxy: the client's view, the status to
    count, and the peak of Python's memory while relaying."""
    sink = Sink()
    async with engine(tmp_path, _answerer(head, body, chunked=chunked, cut=cut)) as (_, pool):
        proxy = Proxy(Metrics(CollectorRegistry()))
        tracemalloc.start()
        try:
            status, _ = await proxy.forward(
                sink, pool, "/v1/completions", b"{}", [], request_id="r", model="m"
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return sink, status, peak


PLAIN = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"


async def test_a_large_answer_with_a_length_is_passed_through_with_bounded_memory(
    tmp_path: Path,
) -> None:
    body = _body(BIG)
    head = PLAIN + b"content-length: %d\r\n\r\n" % BIG
    sink, status, peak = await _relay(tmp_path, head, body)
    assert status == 200 and sink.ended
    assert (sink.size, sink.digest.digest()) == (BIG, hashlib.sha256(body).digest())
    assert sink.header(b"content-length") == [str(BIG).encode()]  # the engine's, relayed
    assert peak < 8 * 1024 * 1024  # never the 50 MB (today: twice that, list and join)
    assert sink.largest < 4 * MAX_BUFFERED


async def test_a_large_chunked_answer_is_passed_through_chunked(tmp_path: Path) -> None:
    body = _body(BIG)
    head = PLAIN + b"transfer-encoding: chunked\r\n\r\n"
    sink, status, peak = await _relay(tmp_path, head, body, chunked=True)
    assert status == 200 and sink.ended
    assert (sink.size, sink.digest.digest()) == (BIG, hashlib.sha256(body).digest())
    assert sink.header(b"content-length") == []  # no length known: the server chunks it
    assert sink.header(b"transfer-encoding") == []
    assert peak < 8 * 1024 * 1024


async def test_an_answer_within_the_buffer_keeps_an_exact_length(tmp_path: Path) -> None:
    size = MAX_BUFFERED - 1000  # in many reads, chunked: still read whole
    body = _body(size)
    head = PLAIN + b"transfer-encoding: chunked\r\n\r\n"
    sink, status, _ = await _relay(tmp_path, head, body, chunked=True)
    assert status == 200 and sink.ended
    assert sink.header(b"content-length") == [str(size).encode()]
    assert sink.largest == size  # one body message: the whole answer


async def test_a_large_answer_broken_off_is_left_unfinished_and_counted_502(
    tmp_path: Path,
) -> None:
    body = _body(8 * MAX_BUFFERED)
    head = PLAIN + b"content-length: %d\r\n\r\n" % len(body)
    sink, status, _ = await _relay(tmp_path, head, body, cut=4 * MAX_BUFFERED)
    assert status == 502
    assert sink.start is not None and sink.start["status"] == 200
    assert not sink.ended  # the server cuts the connection: no client takes it as whole
    assert MAX_BUFFERED < sink.size <= 4 * MAX_BUFFERED


@pytest.mark.parametrize(
    "headers",
    [
        b"x-big: " + b"a" * (2 * 1024 * 1024) + b"\r\n",  # one header, in many reads
        b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 1000) for i in range(70)),  # many, in one
    ],
    ids=["one-2MB-header", "70-headers-of-1kB"],
)
async def test_an_answer_head_over_the_bound_is_a_502(tmp_path: Path, headers: bytes) -> None:
    head = PLAIN + headers + b"content-length: 2\r\n\r\n"
    sink = Sink()
    async with engine(tmp_path, _answerer(head, b"{}")) as (_, pool):
        proxy = Proxy(Metrics(CollectorRegistry()))
        with pytest.raises(HTTPError) as caught:
            await proxy.forward(sink, pool, "/v1/completions", b"{}", [], request_id="r", model="m")
    assert caught.value.status == 502
    assert caught.value.code == "engine_unavailable"
    assert sink.start is None


async def test_a_head_just_under_the_bound_is_taken(tmp_path: Path) -> None:
    value = b"c" * (MAX_HEAD - 1024)
    head = PLAIN + b"x-big: " + value + b"\r\ncontent-length: 2\r\n\r\n"
    async with engine(tmp_path, _answerer(head, b"{}")) as (_, pool):
        response = await pool.post("/v1/completions", b"{}", [])
        assert (response.status_code, await response.aread()) == (200, b"{}")
        assert (b"x-big", value) in response.headers
        response.close()


async def test_a_head_over_the_bound_fails_the_pool_request(tmp_path: Path) -> None:
    head = PLAIN + b"x-big: " + b"d" * MAX_HEAD + b"\r\ncontent-length: 2\r\n\r\n"
    async with engine(tmp_path, _answerer(head, b"{}")) as (_, pool):
        with pytest.raises(RemoteProtocolError, match="head is over"):
            await pool.post("/v1/completions", b"{}", [])
