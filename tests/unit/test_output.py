from __future__ import annotations

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
