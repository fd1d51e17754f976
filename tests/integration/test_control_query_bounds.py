"""Every query value of every control route that is out of its range, or no number at all,
is a clean 400 `bad_request`, with and without `follow`: never a 500, never a dropped stream
(issue 21 item 10: `since` beyond SQLite's 64-bit integers was an OverflowError)."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from tests.integration.harness import fake_config, running
from vllmd.daemon import Running

pytestmark = pytest.mark.anyio

TOO_BIG = "99999999999999999999"
# route -> {parameter: [values out of range or malformed]}; every route with a query is here.
BAD: dict[str, dict[str, list[str]]] = {
    "/v1/events": {
        "since": [TOO_BIG, str(2**63), "-1", "1e3", "\u0663", "2026-13-01T00:00:00Z", "2026-01-01"],
        "limit": ["0", "-1", "1001", TOO_BIG, "1.5", "\u0661\u0660", "1_0", " 5", "0x10"],
        "follow": ["2", "maybe"],
    },
    "/v1/models/a/logs": {
        "tail": ["-1", TOO_BIG, "1e3", "\u0661\u0660"],
        "follow": ["2", "maybe"],
    },
}
VERB_BAD: dict[str, list[str]] = {
    "timeout": ["-1", "86401", "1e309", "inf", "nan", "-0.5"],
    "wait": ["2", "maybe"],
}


def _transport(run: Running) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(uds=str(run.control_socket))


async def _status_and_code(
    http: httpx.AsyncClient, method: str, path: str, params: dict[str, str]
) -> tuple[int, str]:
    """The answer's status and error code; (0, why) for a connection dropped mid-answer."""
    try:
        with anyio.fail_after(5):  # a follow that started streams until the client leaves
            response = await http.request(method, path, params=params)
    except (httpx.HTTPError, TimeoutError) as exc:
        return 0, type(exc).__name__
    try:
        code = str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = response.text[:80]
    return response.status_code, code


async def test_every_out_of_range_query_value_is_400_bad_request_with_and_without_follow(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {}})
    answers: dict[str, tuple[int, str]] = {}
    async with (
        running(config) as run,
        httpx.AsyncClient(transport=_transport(run), base_url="http://vllmd", timeout=10) as http,
    ):
        for path, params in BAD.items():
            for key, values in params.items():
                for value in values:
                    for follow in ({}, {"follow": "1"}):
                        query = {**follow, key: value}
                        answers[f"GET {path} {query}"] = await _status_and_code(
                            http, "GET", path, query
                        )
        for key, values in VERB_BAD.items():
            for value in values:
                answers[f"POST load {key}={value}"] = await _status_and_code(
                    http, "POST", "/v1/models/a/load", {key: value}
                )
        still = await http.get("/v1/status")
    wrong = {k: v for k, v in answers.items() if v != (400, "bad_request")}
    assert wrong == {}, "\n".join(f"{k}: {v}" for k, v in wrong.items())
    assert still.status_code == 200


async def test_the_largest_event_id_is_in_range_and_finds_nothing(tmp_path: Path) -> None:
    """since = 2**63 - 1 (SQLite's largest integer) is a valid id: nothing comes after it."""
    async with (
        running(fake_config(tmp_path, {"a": {}})) as run,
        httpx.AsyncClient(transport=_transport(run), base_url="http://vllmd", timeout=10) as http,
    ):
        answer = await http.get("/v1/events", params={"since": str(2**63 - 1)})
    assert answer.status_code == 200 and answer.json() == {"events": []}
