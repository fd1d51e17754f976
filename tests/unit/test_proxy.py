"""The proxy between the gateway and one engine: what goes upstream, what comes back to the
client, and how an engine failure is told, against an `httpx.MockTransport` engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from vllmd.engine.api import make_client
from vllmd.engine.argv import EngineAddress
from vllmd.gateway.proxy import REQUEST_DROP, RESPONSE_DROP, Proxy
from vllmd.httpserver.asgi import HTTPError, Message
from vllmd.metrics import Metrics

pytestmark = pytest.mark.anyio

Handler = Callable[[httpx.Request], httpx.Response]

ADDRESS = EngineAddress(host="127.0.0.1", port=8123, api_key="engine-key")
ROUTE = "/v1/chat/completions"
BODY = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
REQUEST_ID = "req-42"
MODEL = "tiny"
SSE = [("content-type", "text/event-stream; charset=utf-8")]
# What a client might send: everything but x-custom and content-type must stay behind.
CLIENT_HEADERS = [
    (b"host", b"gateway.example:8000"),
    (b"authorization", b"Bearer client-key"),
    (b"content-length", b"999"),
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"te", b"trailers"),
    (b"x-request-id", b"client-chosen"),
    (b"content-type", b"application/json"),
    (b"x-custom", b"kept"),
]


class Chunks(httpx.AsyncByteStream):
    """An engine's response body: `chunks` as they arrive, then `error` if the engine dies."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


class Client:
    """The ASGI `send` of one request, collecting what the client would receive."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        assert self.messages[0]["type"] == "http.response.start"
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.messages[0]["headers"])

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def chunks(self) -> list[bytes]:
        return [bytes(m["body"]) for m in self.messages[1:]]

    @property
    def ended(self) -> bool:
        """The response was completed: exactly one last body message, the final one."""
        last = [not m.get("more_body", False) for m in self.messages[1:]]
        return last.count(True) == 1 and last[-1]


class Setup:
    def __init__(self, handler: Handler, address: EngineAddress = ADDRESS) -> None:
        self.upstream_requests: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            self.upstream_requests.append(request)
            return handler(request)

        _, self.upstream = make_client(
            address, connect_timeout=1.0, max_connections=4, transport=httpx.MockTransport(record)
        )
        self.metrics = Metrics(CollectorRegistry())
        self.proxy = Proxy(self.metrics)
        self.client = Client()

    async def forward(self, headers: list[tuple[bytes, bytes]] | None = None) -> int:
        status, _ = await self.proxy.forward(
            self.client,
            self.upstream,
            ROUTE,
            BODY,
            CLIENT_HEADERS if headers is None else headers,
            request_id=REQUEST_ID,
            model=MODEL,
        )
        return status

    def first_bytes(self) -> float | None:
        return self.metrics.registry.get_sample_value(
            "vllmd_time_to_first_byte_seconds_count", {"model": MODEL}
        )


def respond(
    stream: Chunks, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Handler:
    return lambda request: httpx.Response(status, headers=headers or [], stream=stream)


# --- what goes upstream ---------------------------------------------------------------------


async def test_upstream_request_has_the_route_the_engine_key_and_an_exact_length() -> None:
    setup = Setup(lambda request: httpx.Response(200, content=b"{}"))
    await setup.forward()
    [request] = setup.upstream_requests
    assert request.method == "POST"
    assert str(request.url) == f"http://127.0.0.1:8123{ROUTE}"
    assert request.content == BODY
    assert request.headers.get_list("authorization") == ["Bearer engine-key"]
    assert request.headers.get_list("content-length") == [str(len(BODY))]
    assert request.headers.get_list("host") == ["engine"]
    assert request.headers.get_list("x-request-id") == [REQUEST_ID]
    assert request.headers["x-custom"] == "kept"
    assert request.headers["content-type"] == "application/json"
    for name in ("connection", "keep-alive", "te"):
        assert name not in request.headers
    # Streams are long: only the connect is bounded.
    assert request.extensions["timeout"] == {
        "connect": 1.0,
        "read": None,
        "write": None,
        "pool": None,
    }


async def test_a_keyless_engine_is_not_sent_the_client_key() -> None:
    """The client's Authorization is the gateway's key: it must never reach an engine."""
    setup = Setup(
        lambda request: httpx.Response(200, content=b"{}"),
        EngineAddress(uds=Path("/nonexistent/engine.sock")),
    )
    await setup.forward()
    [request] = setup.upstream_requests
    assert "authorization" not in request.headers
    assert str(request.url) == f"http://engine{ROUTE}"


async def test_every_dropped_request_header_stays_behind() -> None:
    headers = [(name, b"x") for name in sorted(REQUEST_DROP)] + [(b"x-kept", b"1")]
    setup = Setup(lambda request: httpx.Response(200, content=b"{}"))
    await setup.forward(headers)
    [request] = setup.upstream_requests
    names = [k.lower() for k, v in request.headers.raw]
    own = {b"host", b"content-length", b"authorization", b"x-request-id"}  # set by vllmd
    assert {n for n in names if n in REQUEST_DROP} == own
    assert len(names) == len(set(names))
    assert request.headers["x-kept"] == "1"


# --- a plain answer -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 500])
async def test_a_plain_answer_is_relayed_byte_identical(status: int) -> None:
    body = b'{"id": "cmpl-1", "choices": [{"text": "\xc3\xa9t\xc3\xa9"}]}'
    engine_headers = [
        ("content-type", "application/json"),
        ("x-engine", "vllm"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
        ("server", "uvicorn"),
        ("x-request-id", "engine-chosen"),
        ("content-length", str(len(body))),
    ]
    setup = Setup(respond(Chunks([body[:10], body[10:]]), status, engine_headers))
    assert await setup.forward() == status
    client = setup.client
    assert client.status == status
    assert client.chunks == [body]  # read whole, sent in one message
    assert client.ended
    assert client.header(b"content-length") == [str(len(body)).encode()]
    assert client.header(b"x-request-id") == [REQUEST_ID.encode()]
    assert client.header(b"content-type") == [b"application/json"]
    assert client.header(b"x-engine") == [b"vllm"]
    for name in (b"connection", b"keep-alive", b"date", b"server", b"transfer-encoding"):
        assert client.header(name) == []
    assert setup.first_bytes() == 1


async def test_response_headers_in_the_drop_list_are_not_relayed() -> None:
    engine_headers = [(name.decode(), "x") for name in sorted(RESPONSE_DROP)]
    setup = Setup(respond(Chunks([b"{}"]), 200, [*engine_headers, ("x-kept", "1")]))
    await setup.forward()
    names = [k.lower() for k, v in setup.client.headers]
    assert sorted(names) == sorted([b"x-kept", b"content-length", b"x-request-id"])


async def test_a_plain_answer_broken_off_is_502_before_any_header() -> None:
    stream = Chunks([b'{"id": '], httpx.ReadError("connection reset"))
    setup = Setup(respond(stream, 200, [("content-type", "application/json")]))
    with pytest.raises(HTTPError) as caught:
        await setup.forward()
    assert (caught.value.status, caught.value.code) == (502, "engine_unavailable")
    assert "broke off" in caught.value.message and MODEL in caught.value.message
    assert setup.client.messages == []
    assert stream.closed


# --- a streamed answer ----------------------------------------------------------------------


async def test_an_sse_stream_is_relayed_chunk_by_chunk() -> None:
    chunks = [
        b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n',
        b'data: {"choices": [{"delta": ',  # the engine's chunks need not be whole events
        b'{"content": "lo"}}]}\n\ndata: [DONE]\n\n',
    ]
    stream = Chunks(chunks)
    setup = Setup(respond(stream, 200, [*SSE, ("x-engine", "vllm")]))
    assert await setup.forward() == 200
    client = setup.client
    assert client.status == 200
    assert client.chunks == [*chunks, b""]
    assert all(m["more_body"] for m in client.messages[1:-1])
    assert client.ended
    assert client.header(b"content-length") == []  # length unknown: the server chunks it
    assert client.header(b"x-request-id") == [REQUEST_ID.encode()]
    assert client.header(b"x-engine") == [b"vllm"]
    assert setup.first_bytes() == 1
    assert stream.closed


@pytest.mark.parametrize(
    ("chunks", "separator"),
    [
        ([b"data: 1\n\n", b'data: {"choices": [{"delta'], b"\n\n"),  # cut mid-line
        ([b"data: 1\n\n", b"data: 2\n"], b"\n"),  # cut before the blank line
        ([b"data: 1\n\n", b"data: 2\n\n"], b""),  # cut between events
        ([], b""),  # cut before the first byte
    ],
    ids=["mid-line", "mid-event", "between-events", "no-bytes"],
)
async def test_a_stream_broken_off_ends_with_one_error_event(
    chunks: list[bytes], separator: bytes
) -> None:
    """An engine dying mid-stream: the client gets what was sent, then one whole SSE event
    carrying the error, never merged into the half event; metrics and logs count a 502."""
    stream = Chunks(chunks, httpx.ReadError("connection reset"))
    setup = Setup(respond(stream, 200, SSE))
    assert await setup.forward() == 502
    client = setup.client
    assert client.status == 200  # headers were sent before the engine failed
    assert client.chunks[: len(chunks)] == chunks
    error_event, end = client.chunks[len(chunks) :]
    assert end == b"" and client.ended
    assert error_event.startswith(separator + b"data: {")
    assert error_event.endswith(b"\n\n")
    last_event = b"".join(client.chunks).split(b"\n\n")[-2]
    assert last_event.startswith(b"data: ")
    error = json.loads(last_event[len(b"data: ") :])["error"]
    assert error["code"] == "engine_unavailable"
    assert error["type"] == "server_error"
    assert "ReadError" in error["message"] and MODEL in error["message"]
    assert stream.closed


# --- no answer at all -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError]
)
async def test_an_engine_that_does_not_answer_is_502_engine_unavailable(
    error: type[httpx.TransportError],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("no answer", request=request)

    setup = Setup(handler)
    with pytest.raises(HTTPError) as caught:
        await setup.forward()
    assert (caught.value.status, caught.value.code) == (502, "engine_unavailable")
    assert error.__name__ in caught.value.message and MODEL in caught.value.message
    assert setup.client.messages == []
    assert setup.first_bytes() is None
