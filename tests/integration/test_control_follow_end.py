"""`vllmctl logs NAME -f` of a model that goes away (issue 21 item 9): when the model's
output is closed (the supervisor does it as a reload removes the model), the follower gets
the last line and a clean end of the chunked answer, and its control slot is free again."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from tests.integration.harness import fake_config, running

pytestmark = pytest.mark.anyio


async def test_a_logs_follower_ends_with_the_last_line_when_the_output_is_closed(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {}})
    async with running(config) as run:
        transport = httpx.AsyncHTTPTransport(uds=str(run.control_socket))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://vllmd", timeout=10
        ) as ctl:
            assert (await ctl.post("/v1/models/a/load")).status_code == 200
            output = run.supervisor.get("a").output
            lines: list[str] = []
            params = {"tail": "1", "follow": "1"}
            async with ctl.stream("GET", "/v1/models/a/logs", params=params) as stream:
                received = stream.aiter_lines()
                lines.append(json.loads(await anext(received))["line"])  # the tail: following
                output.append("the engine's last words")
                output.close("model a was removed by a reload")
                with anyio.fail_after(5):  # ends by itself: no client-side cut
                    lines += [json.loads(line)["line"] async for line in received]
            after = await ctl.get("/v1/status")
    assert lines[1:] == ["the engine's last words", "model a was removed by a reload"]
    assert after.status_code == 200
