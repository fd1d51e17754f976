"""The gateway's per-request log line: under the JSON set-up it is written directly, byte for
byte the line structlog writes; under any other it is an ordinary structlog event."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from vllmd.log import RequestLog, rounded

pytestmark = pytest.mark.anyio


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """configure()'s JSON chain, into a buffer."""
    out = io.StringIO()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    try:
        yield out
    finally:
        structlog.reset_defaults()


async def test_the_direct_line_is_the_line_structlog_writes(json_log: io.StringIO) -> None:
    logger = structlog.get_logger("vllmd.gateway")
    fields = ('id "quoted" é', "m", "/v1/completions", 200, 0.00123456)
    request_log = RequestLog(logger)
    request_log.request(*fields)
    request_log.flush()
    request_id, model, route, status, seconds = fields
    logger.info(
        "request",
        request_id=request_id,
        model=model,
        route=route,
        status=status,
        seconds=round(seconds, 4),
    )
    direct, ordinary = json_log.getvalue().splitlines()
    stamp = re.compile(r'"timestamp": "[0-9T:.-]+Z"')
    assert stamp.sub("", direct) == stamp.sub("", ordinary)
    assert json.loads(direct)["request_id"] == request_id


async def test_lines_wait_for_the_flush_then_go_together(json_log: io.StringIO) -> None:
    request_log = RequestLog(structlog.get_logger("vllmd.gateway"))
    for i in range(3):
        request_log.request(f"r{i}", "m", "/v1/completions", 200, 0.001)
    assert json_log.getvalue() == ""
    request_log.flush()
    assert [json.loads(x)["request_id"] for x in json_log.getvalue().splitlines()] == [
        "r0",
        "r1",
        "r2",
    ]


def test_any_other_setup_gets_an_ordinary_event() -> None:
    with capture_logs() as logs:
        RequestLog(structlog.get_logger("vllmd.gateway")).request(
            "r1", "m", "/v1/completions", 499, 0.5
        )
    assert logs == [
        {
            "event": "request",
            "log_level": "info",
            "request_id": "r1",
            "model": "m",
            "route": "/v1/completions",
            "status": 499,
            "seconds": 0.5,
        }
    ]


def test_seconds_are_written_as_repr_of_round_to_four_places() -> None:
    values = [0.0, 0.5, 2.0, 1e-5, 5e-5, 0.00015, 0.00025, 123.45675, 99999.99995, 0.1 + 0.2]
    rng = random.Random(7)
    values += [rng.random() * 10 ** rng.randint(-6, 6) for _ in range(20000)]
    values += [rng.randint(0, 10**7) / 10 ** rng.randint(0, 8) for _ in range(20000)]
    assert [rounded(v) for v in values] == [repr(round(v, 4)) for v in values]


async def test_a_bound_context_sends_the_line_through_structlog(json_log: io.StringIO) -> None:
    """The direct line skips structlog's context walk only while nothing was ever bound."""
    request_log = RequestLog(structlog.get_logger("vllmd.gateway"))
    with structlog.contextvars.bound_contextvars(peer="p1"):
        request_log.request("r1", "m", "/v1/completions", 200, 0.001)
    request_log.request("r2", "m", "/v1/completions", 200, 0.001)
    request_log.flush()
    lines = [json.loads(x) for x in json_log.getvalue().splitlines()]
    assert [(x["request_id"], x.get("peer")) for x in lines] == [("r1", "p1"), ("r2", None)]
    assert all(re.fullmatch(r"[0-9T:-]+\.[0-9]{6}Z", x["timestamp"]) for x in lines)
