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
