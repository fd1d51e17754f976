from __future__ import annotations

import anyio
import pytest
import structlog

from vllmd.engine.output import EngineOutput


def test_since_start_sees_only_the_current_engines_lines() -> None:
    out = EngineOutput(structlog.get_logger(), lines=10)
    out.append("old 1")
    out.append("old 2")
    out.mark_start()
    assert out.since_start() == []
    out.append("new 1")
    assert out.since_start() == ["new 1"]


def test_ring_buffer_keeps_the_last_lines() -> None:
    out = EngineOutput(structlog.get_logger(), lines=3)
    for i in range(5):
        out.append(str(i))
    assert list(out) == ["2", "3", "4"]
    assert out.since_start(last=2) == ["3", "4"]


def test_the_engine_is_about_to_serve_once_vllm_says_so() -> None:
    """vLLM logs "Starting vLLM server on ..." just before it serves (its Unix socket exists
    long before): readiness is polled faster from then on; a new engine starts over."""
    out = EngineOutput(structlog.get_logger(), lines=10)
    out.append("(APIServer pid=1) INFO 12-07 01:22:29 [loggers.py:335] Engine 000: ...")
    assert not out.serving
    out.append(
        "(APIServer pid=1) INFO 12-07 01:22:29 [entry.py:140] Starting vLLM server on unix:/x"
    )
    assert out.serving
    out.mark_start()
    assert not out.serving


async def _followed(out: EngineOutput, cursor: int) -> list[str]:
    with anyio.fail_after(2):
        return [line async for line in out.follow(cursor)]


@pytest.mark.anyio
async def test_close_ends_every_follower_now_and_later_with_the_last_line() -> None:
    """A model removed by a reload: its followers (`vllmctl logs -f`) get what came before,
    then the given last line, and end; one that starts following later too."""
    out = EngineOutput(structlog.get_logger(), lines=10)
    out.append("before")
    _, cursor = out.tail(0)
    got: list[str] = []

    async def follower() -> None:
        got.extend(await _followed(out, cursor))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follower)
        await anyio.sleep(0.05)  # it waits for a line
        out.append("one")
        out.append("two")
        out.close("model a was removed by a reload")
        out.append("after the close")  # the engine's last words: in the ring, not followed
    later = await _followed(out, 0)
    assert got == ["one", "two", "model a was removed by a reload"]
    assert later == ["before", "one", "two", "model a was removed by a reload"]
    assert out.tail(1)[0] == ["after the close"]


@pytest.mark.anyio
async def test_a_follower_that_fell_behind_the_ring_gets_what_it_holds_then_the_end() -> None:
    out = EngineOutput(structlog.get_logger(), lines=3)
    _, cursor = out.tail(0)
    for i in range(5):
        out.append(str(i))
    out.close("gone")
    out.close("closed twice: the first last line stays")
    assert await _followed(out, cursor) == ["2", "3", "4", "gone"]
