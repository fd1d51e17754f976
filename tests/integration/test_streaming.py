"""Streaming and cancellation through the gateway, against fake engines (whole daemon)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.integration.harness import chat, client, eventually, fake_config, running
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _next_event(lines: AsyncIterator[str]) -> str:
    """The next SSE data line; fails (instead of hanging) if none comes."""
    with anyio.fail_after(15):
        async for line in lines:
            if line:
                return line
    raise AssertionError("the stream ended")


async def test_stream_is_relayed_chunk_by_chunk_unbuffered(tmp_path: Path) -> None:
    """The engine sends chunk i+1 only once the client holds chunk i (a gate file the test
    creates): any buffering in the gateway would stall this test, whatever the timing."""
    gate = tmp_path / "gate"
    gate.mkdir()
    config = fake_config(
        tmp_path, {"m": {"env": {"FAKE_MODE": f"stream_gate:{gate}", "FAKE_TOKEN_DELAY": "0"}}}
    )
    chunks = 6
    async with (
        running(config) as run,
        client(run) as http,
        http.stream("POST", "/v1/completions", json=chat("m", stream=True, max_tokens=chunks)) as r,
    ):
        assert r.status_code == 200
        lines = r.aiter_lines()
        for i in range(chunks):
            line = await _next_event(lines)
            assert line.startswith("data: {"), line
            text = json.loads(line.removeprefix("data: "))["choices"][0]["text"]
            assert text.strip() == ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur"][i]
            (gate / str(i + 1)).touch()
        assert await _next_event(lines) == "data: [DONE]"


async def test_stream_that_breaks_ends_with_one_error_event(tmp_path: Path) -> None:
    """The engine dies after 3 chunks: the client gets them, then one `data: {"error"}`
    event, then the end of the stream."""
    config = fake_config(
        tmp_path, {"m": {"env": {"FAKE_MODE": "stream_break_after:3", "FAKE_TOKEN_DELAY": "0"}}}
    )
    async with running(config) as run, client(run) as http:
        body = chat("m", stream=True, max_tokens=10)
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            with anyio.fail_after(15):
                events = [line async for line in r.aiter_lines() if line]
        samples = run.metrics.registry
        broken = samples.get_sample_value(
            "vllmd_requests_total",
            {"model": "m", "endpoint": "/v1/chat/completions", "code": "502"},
        )
    assert len(events) == 4, events
    for line in events[:3]:
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"
    assert events[3].startswith("data: ")
    error = json.loads(events[3].removeprefix("data: "))["error"]
    assert error["code"] == "engine_unavailable" and error["type"] and error["message"]
    assert broken == 1.0


async def test_client_leaving_a_non_streamed_request_cancels_it_upstream(tmp_path: Path) -> None:
    """vLLM aborts a request whose connection closes: the gateway must close it when its own
    client leaves, for plain (non-streamed) requests too."""
    events = tmp_path / "events"
    env = {"FAKE_EVENTS_FILE": str(events), "FAKE_TOKEN_DELAY": "1"}  # 100 tokens: 100 s
    config = fake_config(tmp_path, {"m": {"env": env}})
    async with running(config) as run, client(run) as http:
        instance = run.supervisor.instances["m"]
        async with anyio.create_task_group() as tg:

            async def slow() -> None:
                await http.post(
                    "/v1/chat/completions",
                    json=chat("m", max_tokens=100),
                    headers={"X-Request-Id": "slow"},
                )

            tg.start_soon(slow)
            await eventually(lambda: "request /v1/chat/completions slow" in _lines(events), 15)
            assert instance.in_flight == 1
            tg.cancel_scope.cancel()  # the client leaves: httpx closes its connection
        await eventually(lambda: "cancelled slow" in _lines(events), 10)
        await eventually(lambda: instance.in_flight == 0)
        assert instance.state is InstanceState.READY
