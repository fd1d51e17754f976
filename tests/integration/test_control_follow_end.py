"""`vllmctl logs NAME -f` of a model that goes away (issue 21 item 9): when the model's
output is closed (the supervisor does it as a reload removes the model), the follower gets
the last line and a clean end of the chunked answer, and its control slot is free again."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from tests.integration.harness import control, fake_config, fake_model, running, write_fake_config
from vllmd.config import load_config

pytestmark = pytest.mark.anyio


async def test_a_logs_follower_ends_with_the_last_line_when_the_output_is_closed(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {}})
    async with running(config) as run, control(run, timeout=10) as ctl:
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


async def test_a_reload_that_removes_the_model_ends_its_logs_followers(tmp_path: Path) -> None:
    """The supervisor closes a removed model's output: `logs -f` ends with the reason."""
    path = tmp_path / "vllmd.toml"
    _write_config(path, ["a", "b"])
    async with running(load_config(path)) as run, control(run, timeout=10) as ctl:
        assert (await ctl.post("/v1/models/a/load")).status_code == 200
        lines: list[str] = []
        params = {"tail": "0", "follow": "1"}
        async with ctl.stream("GET", "/v1/models/a/logs", params=params) as stream:
            received = stream.aiter_lines()
            _write_config(path, ["b"])
            async with anyio.create_task_group() as tg:
                reloaded: list[httpx.Response] = []

                async def reload() -> None:
                    reloaded.append(await ctl.post("/v1/reload"))

                tg.start_soon(reload)
                with anyio.fail_after(10):  # ends by itself: no client-side cut
                    lines += [json.loads(line)["line"] async for line in received]
        after = await ctl.get("/v1/status")
    assert reloaded[0].status_code == 200 and reloaded[0].json()["removed"] == ["a"]
    assert lines[-1] == "model a was removed by a reload"
    assert after.status_code == 200


def _write_config(path: Path, models: list[str]) -> None:
    tables = "".join(fake_model(n) for n in models)
    write_fake_config(path, tables, engine='health_interval = "200ms"')
