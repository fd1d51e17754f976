"""The engine's HTTP surface as vllmd calls it, against an `httpx.MockTransport` engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from vllmd.engine.api import EngineAPI, make_client
from vllmd.engine.argv import EngineAddress
from vllmd.errors import EngineUnavailable

pytestmark = pytest.mark.anyio

Handler = Callable[[httpx.Request], httpx.Response]

TCP = EngineAddress(host="127.0.0.1", port=8123, api_key="engine-key")
UDS = EngineAddress(uds=Path("/nonexistent/engine.sock"))  # the mock never opens it


@asynccontextmanager
async def engine(
    handler: Handler, address: EngineAddress = TCP
) -> AsyncIterator[tuple[EngineAPI, list[httpx.Request]]]:
    """An `EngineAPI` whose engine is `handler`, and the requests it was sent, in order."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client, _ = make_client(
        address, connect_timeout=1.0, max_connections=4, transport=httpx.MockTransport(record)
    )
    async with client:
        yield EngineAPI(client), seen


def answer(status: int, payload: object = None) -> Handler:
    return lambda request: httpx.Response(status, json=payload)


def raising(error: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("engine unreachable", request=request)

    return handler


def sent(requests: list[httpx.Request]) -> list[tuple[str, str, str]]:
    return [(r.method, r.url.path, r.url.query.decode()) for r in requests]


async def test_healthy_when_health_answers_200() -> None:
    async with engine(answer(200)) as (api, seen):
        assert await api.healthy(timeout=0.5) is True
    assert sent(seen) == [("GET", "/health", "")]
    assert seen[0].extensions["timeout"]["read"] == 0.5


@pytest.mark.parametrize(
    "handler",
    [
        answer(500),
        answer(503),
        raising(httpx.ConnectError),
        raising(httpx.ConnectTimeout),
        raising(httpx.ReadTimeout),
    ],
    ids=["500", "503", "connect-error", "connect-timeout", "read-timeout"],
)
async def test_unhealthy_on_server_error_or_no_answer(handler: Handler) -> None:
    """A starting engine refuses connections: that is "not healthy", never an exception."""
    async with engine(handler) as (api, _):
        assert await api.healthy() is False


@pytest.mark.parametrize("level", [1, 2])
async def test_sleep_posts_the_level_as_a_query(level: int) -> None:
    async with engine(answer(200)) as (api, seen):
        await api.sleep(level)
    assert sent(seen) == [("POST", "/sleep", f"level={level}")]


async def test_sleep_refused_by_the_engine_raises_engine_unavailable() -> None:
    """httpx's errors stop here: the instance sees vllmd's own, refused or not."""
    async with engine(answer(500)) as (api, _):
        with pytest.raises(EngineUnavailable, match="500") as caught:
            await api.sleep(1)
    assert caught.value.refused is True
    assert isinstance(caught.value.__cause__, httpx.HTTPStatusError)


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout])
async def test_an_unreachable_engine_raises_engine_unavailable(
    error: type[httpx.TransportError],
) -> None:
    async with engine(raising(error)) as (api, _):
        for call in (api.sleep(1), api.is_sleeping(), api.wake_up(1), api.metrics()):
            with pytest.raises(EngineUnavailable, match="engine unreachable") as caught:
                await call
            assert caught.value.refused is False


@pytest.mark.parametrize("asleep", [True, False])
async def test_is_sleeping_reads_the_engine_answer(asleep: bool) -> None:
    async with engine(answer(200, {"is_sleeping": asleep})) as (api, seen):
        assert await api.is_sleeping() is asleep
    assert sent(seen) == [("GET", "/is_sleeping", "")]


@pytest.mark.parametrize("payload", [{"is_sleeping": "yes"}, {}, [True]])
async def test_is_sleeping_rejects_a_malformed_answer(payload: object) -> None:
    async with engine(answer(200, payload)) as (api, _):
        with pytest.raises(EngineUnavailable, match="is_sleeping"):
            await api.is_sleeping()


async def test_is_sleeping_rejects_an_answer_that_is_not_json() -> None:
    async with engine(lambda request: httpx.Response(200, text="<html>")) as (api, _):
        with pytest.raises(EngineUnavailable, match="Expecting value"):
            await api.is_sleeping()


async def test_wake_up_level_1_is_one_call() -> None:
    async with engine(answer(200)) as (api, seen):
        await api.wake_up(1)
    assert sent(seen) == [("POST", "/wake_up", "")]


async def test_wake_up_level_2_reloads_weights_before_the_kv_cache() -> None:
    """Level 2 discarded the weights: reload them, then allocate the cache, then drop the
    prefix cache that points at the old memory."""
    async with engine(answer(200)) as (api, seen):
        await api.wake_up(2)
    assert sent(seen) == [
        ("POST", "/wake_up", "tags=weights"),
        ("POST", "/collective_rpc", ""),
        ("POST", "/wake_up", "tags=kv_cache"),
        ("POST", "/reset_prefix_cache", ""),
    ]
    assert json.loads(seen[1].content) == {"method": "reload_weights"}


async def test_wake_up_stops_at_the_first_refused_step() -> None:
    async with engine(answer(500)) as (api, seen):
        with pytest.raises(EngineUnavailable):
            await api.wake_up(2)
    assert sent(seen) == [("POST", "/wake_up", "tags=weights")]


async def test_warm_up_sends_a_one_token_completion() -> None:
    async with engine(answer(200)) as (api, seen):
        assert await api.warm_up("tiny") is None
    assert sent(seen) == [("POST", "/v1/completions", "")]
    assert json.loads(seen[0].content) == {"model": "tiny", "prompt": "hi", "max_tokens": 1}


async def test_warm_up_falls_back_to_an_embedding_for_pooling_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400 if request.url.path == "/v1/completions" else 200)

    async with engine(handler) as (api, seen):
        assert await api.warm_up("embedder") is None
    assert sent(seen) == [("POST", "/v1/completions", ""), ("POST", "/v1/embeddings", "")]
    assert json.loads(seen[1].content) == {"model": "embedder", "input": "hi"}


async def test_a_model_that_refuses_both_tasks_failed_no_warm_up() -> None:
    async with engine(answer(400)) as (api, seen):
        assert await api.warm_up("reranker") is None
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("handler", "says"),
    [
        (answer(500), "/v1/completions answered 500"),
        (raising(httpx.ReadTimeout), "did not answer within 7s"),
        (raising(httpx.ConnectError), "/v1/completions failed"),
    ],
    ids=["500", "timeout", "connection"],
)
async def test_a_failed_warm_up_says_what_failed(handler: Handler, says: str) -> None:
    async with engine(handler) as (api, seen):
        failure = await api.warm_up("tiny", timeout=7)
    assert failure is not None and says in failure
    assert len(seen) == 1  # an engine that cannot infer is not asked for an embedding


async def test_metrics_returns_the_exposition_text() -> None:
    text = "vllm:num_requests_running 0\n"
    async with engine(lambda request: httpx.Response(200, text=text)) as (api, seen):
        assert await api.metrics() == text
    assert sent(seen) == [("GET", "/metrics", "")]


async def test_every_call_carries_the_engine_key() -> None:
    async with engine(answer(200, {"is_sleeping": False})) as (api, seen):
        await api.healthy()
        await api.sleep(1)
        await api.is_sleeping()
        await api.wake_up(2)
        await api.warm_up("tiny")
    assert len(seen) == 8
    for request in seen:
        assert request.headers.get_list("authorization") == ["Bearer engine-key"]
        assert request.url.host == "127.0.0.1" and request.url.port == 8123


async def test_a_keyless_unix_socket_engine_gets_no_authorization() -> None:
    async with engine(answer(200), UDS) as (api, seen):
        assert await api.healthy() is True
    assert "authorization" not in seen[0].headers
    assert str(seen[0].url) == "http://engine/health"


async def test_the_upstream_goes_through_the_same_transport() -> None:
    """The injected transport replaces the pool for the proxy's path too, not only the client."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"{}")

    transport = httpx.MockTransport(handler)
    client, upstream = make_client(TCP, connect_timeout=1.0, max_connections=4, transport=transport)
    async with client:
        await client.get("/health")
        response = await upstream.post("/v1/completions", b"{}", [])
        assert await response.aread() == b"{}"
    assert [r.url.path for r in seen] == ["/health", "/v1/completions"]


async def test_is_sleeping_rejects_an_answer_nested_too_deep_to_parse() -> None:
    """Regression: a RecursionError from the JSON parser is no ValueError; it must still be
    the engine's failure (a sleep_failed event), not an exception through the daemon."""
    deep = "[" * 100_000 + "]" * 100_000
    async with engine(lambda request: httpx.Response(200, text=deep)) as (api, _):
        with pytest.raises(EngineUnavailable):
            await api.is_sleeping()


async def test_version_reads_the_engines_answer_and_is_none_otherwise() -> None:
    async with engine(answer(200, {"version": "0.32.0"})) as (api, seen):
        assert await api.version() == "0.32.0"
    assert sent(seen) == [("GET", "/version", "")]
    for handler in (answer(404), answer(200, {"version": 3}), answer(200, [1])):
        async with engine(handler) as (api, _):
            assert await api.version() is None
    async with engine(raising(httpx.ConnectError)) as (api, _):
        assert await api.version() is None
