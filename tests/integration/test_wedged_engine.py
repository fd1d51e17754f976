"""A wedged engine (SIGSTOPped: /health and every answer stop) is restarted after
health_failures like an idle one, even while requests wait on it, and those requests fail
promptly; an engine whose /health fails while its answers make progress is not restarted."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import anyio
import pytest

from tests.integration.harness import chat, client, eventually, fake_config, running
from vllmd.config import Config
from vllmd.engine.api import EngineAPI
from vllmd.instance import session
from vllmd.instance.instance import Instance
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio

# A slow engine: an answer of 40 tokens takes 8 s, streamed or not.
SLOW = {"FAKE_TOKEN_DELAY": "0.2"}
INTERVAL, FAILURES = 0.2, 2
# Each failed check waits the interval, then the check's own timeout (1 s at least): the
# restart is decided after FAILURES of them; its waiting requests fail then.
DECIDED = FAILURES * (INTERVAL + 1.0)


def _config(tmp_path: Path, starts: Path) -> Config:
    return fake_config(
        tmp_path,
        {"m": {"env": {**SLOW, "FAKE_STARTS_FILE": str(starts)}}},
        engine={"health_interval": f"{INTERVAL}s", "health_failures": FAILURES},
    )


@contextmanager
def _stopped(instance: Instance) -> Iterator[None]:
    """SIGSTOP the engine's whole process group (SIGCONT at the end, if it is still there)."""
    pgid = instance.pgid()
    assert pgid is not None
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)


async def _ready(instance: Instance) -> None:
    with anyio.fail_after(10):
        await instance.wait_state(InstanceState.READY)


async def test_a_wedged_engine_is_restarted_and_its_waiting_request_fails_promptly(
    tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    async with running(_config(tmp_path, starts)) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=chat("m", max_tokens=1))).status_code == 200
        instance = run.supervisor.instances["m"]
        async with anyio.create_task_group() as tg:
            answers: list[tuple[float, int, dict[str, object]]] = []

            async def waiting() -> None:
                r = await http.post("/v1/chat/completions", json=chat("m", max_tokens=40))
                answers.append((time.monotonic(), r.status_code, r.json()))

            tg.start_soon(waiting)
            await eventually(lambda: instance.in_flight == 1)
            with _stopped(instance):
                stopped = time.monotonic()
                with anyio.fail_after(DECIDED + 4):  # today: never (busy() kept it healthy)
                    await instance.wait_state(InstanceState.BACKOFF)
                assert "health checks" in (instance.last_error or "")
                with anyio.fail_after(2):  # at once, not after the stop (3 s) nor the 8 s
                    await eventually(lambda: bool(answers), timeout=2)
        answered, status, body = answers[0]
        assert status == 502
        assert body["error"]["code"] == "engine_unavailable"  # type: ignore[index]
        assert answered - stopped < DECIDED + 3
        await _ready(instance)  # restarted
        assert (await http.post("/v1/completions", json=chat("m", max_tokens=1))).status_code == 200
    assert len(starts.read_text().splitlines()) == 2


async def test_a_stream_on_a_wedged_engine_ends_with_an_error_event_promptly(
    tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    async with running(_config(tmp_path, starts)) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=chat("m", max_tokens=1))).status_code == 200
        instance = run.supervisor.instances["m"]
        body = chat("m", stream=True, max_tokens=40)
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")
            with _stopped(instance):
                stopped = time.monotonic()
                events: list[str] = []
                with anyio.fail_after(DECIDED + 4):  # today: never
                    async for line in lines:
                        if line.startswith("data: "):
                            events.append(line[6:])
        ended = time.monotonic() - stopped
        error = json.loads(events[-1])
        assert error["error"]["code"] == "engine_unavailable"
        assert ended < DECIDED + 3
        await _ready(instance)
    assert len(starts.read_text().splitlines()) == 2


async def test_an_engine_whose_health_fails_while_its_stream_flows_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opposite error: bytes moving on its connections are progress. (/health is made to
    fail for the whole stream: 40 tokens over 8 s, ~6 failed checks in a row.)"""
    starts = tmp_path / "starts"
    async with running(_config(tmp_path, starts)) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=chat("m", max_tokens=1))).status_code == 200
        instance = run.supervisor.instances["m"]

        async def sick(self: EngineAPI, timeout: float = 2.0) -> bool:
            await anyio.sleep(min(timeout, 1.0))
            return False

        monkeypatch.setattr(EngineAPI, "healthy", sick)
        body = chat("m", stream=True, max_tokens=40)
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            text = (await r.aread()).decode()
        assert r.status_code == 200
        assert "engine_unavailable" not in text and text.rstrip().endswith("data: [DONE]")
        assert instance.state is InstanceState.READY
        monkeypatch.undo()
    assert len(starts.read_text().splitlines()) == 1


async def test_progress_excuses_a_failing_health_check_for_busy_grace_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes that keep running while the API server is stuck (vLLM's workers may spin)
    excuse failed checks only so long: past BUSY_GRACE (1.5 s here) they count, and the
    engine is restarted in the middle of a stream that still flows."""
    monkeypatch.setattr(session, "BUSY_GRACE", 1.5)
    starts = tmp_path / "starts"
    async with running(_config(tmp_path, starts)) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=chat("m", max_tokens=1))).status_code == 200

        async def sick(self: EngineAPI, timeout: float = 2.0) -> bool:
            await anyio.sleep(min(timeout, 1.0))
            return False

        monkeypatch.setattr(EngineAPI, "healthy", sick)
        body = chat("m", stream=True, max_tokens=40)  # 8 s of tokens
        started = time.monotonic()
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            text = (await r.aread()).decode()
        took = time.monotonic() - started
        monkeypatch.undo()
        await eventually(lambda: len(starts.read_text().splitlines()) == 2, timeout=10)
    assert r.status_code == 200 and "engine_unavailable" in text
    assert took < 1.5 + DECIDED + 2  # restarted, not left until the stream ended (8 s)
