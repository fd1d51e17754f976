"""Property-based fuzzing of the control API's routes and query values (docs/design.md
"Control API"), against one daemon with fake engines for the whole module.

The property: whatever a local client sends, the answer is a route's own (200, or 202 for a
verb with `wait=false`), or an error `{"error": {"code", "message", ...}}` with a code of the
closed set (vllmd/control/errors.py) at its status, or the listener's 408 `bad_request`;
never a 500 `internal_error` or a dropped connection; `not_found`, `method_not_allowed`,
`model_not_found` and `bad_request` only where the design says so (every query value out of
its range is a 400, every one in range is not); and afterwards GET /v1/status is still 200.
`follow=1` streams are closed by the test after their head.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import anyio
import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz import weighted
from tests.fuzz.wire import Answer, NoAnswer, exchange
from tests.integration.harness import fake_config, running
from vllmd.control.errors import STATUSES
from vllmd.daemon import Running

pytestmark = pytest.mark.anyio

ANSWER_TIMEOUT = 20.0  # a verb waits for a fake engine's start or stop
MODELS: dict[str, dict[str, Any]] = {"a": {"aliases": ["org/a-alias"]}, "b": {}}
NAMES = frozenset({"a", "org/a-alias", "b"})
VERBS = ("load", "unload", "sleep", "wake", "restart", "pin", "unpin")
MAX_EVENT_ID = 2**63 - 1
BOOLS = frozenset({"1", "true", "yes", "0", "false", "no"})


@pytest.fixture(scope="module")
async def daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with running(fake_config(tmp_path_factory.mktemp("ctl"), MODELS)) as run:
        yield run


# --- what is sent -------------------------------------------------------------------------

NAME_FORMS = ["a", "b", "org%2Fa-alias", "org/a-alias", "nope", "", "..", "%2e", "%C3%A9", "%ff"]
ROUTES = [
    "/v1/status",
    "/v1/models",
    "/v1/devices",
    "/v1/plan",
    "/v1/alerts",
    "/v1/events",
    "/v1/reload",
    "/metrics",
    "/v1",
    "/",
    "/v2/status",
    "/v1/nope",
]
INTEGERS = st.one_of(
    st.integers(-5, 2100),
    st.sampled_from([0, 1, 1000, 1001, 2000, 2001, 10**9, 10**9 + 1, MAX_EVENT_ID]),
    st.sampled_from([MAX_EVENT_ID + 1, 2**64, 10**30, 10**31, -(2**63), 10**40]),
    st.integers(),
)
TIMES = [
    "2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00+05:30",
    "1970-01-01T00:00:00Z",
    "0001-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59-23:59",
    "2026-01-01",
    "2026-01-01T00:00:00",
    "2026-13-01T00:00:00Z",
    "yesterday",
]
NUMBER_TEXTS = [
    "9" * 5000,
    "-" + "0" * 40 + "5",
    "1e3",
    "1.5",
    "-0.5",
    "inf",
    "nan",
    "1e309",
    "0x10",
    "1_0",
    " 5",
    "+5",
    "\u0661",
]
VALUES = st.one_of(
    INTEGERS.map(str),
    st.sampled_from(sorted(BOOLS | {"True", "YES", "2", "maybe", "", "on"})),
    st.sampled_from(TIMES + NUMBER_TEXTS),
    st.floats().map(str),
    st.text(max_size=10),
)
KEYS = ["tail", "follow", "since", "limit", "type", "model", "wait", "timeout", "x"]


@st.composite
def queries(draw: st.DrawFn) -> str:
    """A query string: known keys with any values, sometimes repeated or raw junk."""
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
    query = urlencode(pairs, quote_via=quote)
    junk = ["a=%ff", "&&", "=", "follow", "tail=%00", "since=%2B1", "limit=1;2", "tail=1&tail=-1"]
    return str(weighted(draw, (8, query), (1, draw(st.sampled_from(junk)))))


@st.composite
def targets(draw: st.DrawFn) -> str:
    name = weighted(
        draw, (3, draw(st.sampled_from(NAME_FORMS[:3]))), (2, draw(st.sampled_from(NAME_FORMS)))
    )
    verb = draw(st.sampled_from([*VERBS, "logs", "nope", "LOAD", ""]))
    route = weighted(
        draw,
        (3, draw(st.sampled_from(ROUTES))),
        (2, f"/v1/models/{name}"),
        (5, f"/v1/models/{name}/{verb}"),
        (1, f"/v1/models/{name}/{verb}/x"),
        (1, "/" + "/".join(draw(st.lists(st.sampled_from(["v1", "models", "a", "..", ""]))))),
    )
    # follow=1 often: the streams are the readers' hardest case.
    if route.endswith(("/logs", "/events")) and draw(st.booleans()):
        route += "?follow=1&" + draw(queries())
    elif draw(st.booleans()):
        route += "?" + draw(queries())
    return str(route + weighted(draw, (10, ""), (1, draw(st.sampled_from(["/", "//", "#x"])))))


def method_for(route: str) -> str:
    path = urlsplit(route).path.rstrip("/")
    return "POST" if path.endswith(VERBS) or path.endswith("/reload") else "GET"


# --- what may come back --------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    kind: str  # status, models, model, logs, verb, events, reload, ...
    method: str
    name: str | None = None


def control_route(target: str) -> Route | None:
    """The design's route for `target`, or None: segments compared percent-decoded."""
    parts = [unquote(p) for p in urlsplit(target).path.strip("/").split("/")]
    if parts == ["metrics"]:
        return Route("metrics", "GET")
    if len(parts) < 2 or parts[0] != "v1":
        return None
    rest = parts[1:]
    simple = {"status": "GET", "devices": "GET", "plan": "GET", "reload": "POST"}
    simple |= {"alerts": "GET", "events": "GET", "models": "GET"}
    if len(rest) == 1 and rest[0] in simple:
        return Route(rest[0], simple[rest[0]])
    if rest[0] == "models" and len(rest) == 2:
        return Route("model", "GET", rest[1])
    if rest[0] == "models" and len(rest) == 3 and rest[2] == "logs":
        return Route("logs", "GET", rest[1])
    if rest[0] == "models" and len(rest) == 3 and rest[2] in VERBS:
        return Route("verb", "POST", rest[1])
    return None


def _whole(raw: str, low: int, high: int) -> bool | None:
    """In range (True), out of it (False), or a number the design leaves open (None)."""
    if not raw.isascii() or not raw.lstrip("-").isdigit() or raw.count("-") > raw[:1].count("-"):
        return False
    if len(raw.lstrip("-0")) > 30:
        return False
    return low <= int(raw) <= high


def _since(raw: str) -> bool | None:
    if raw.isascii() and raw.isdigit():
        return len(raw.lstrip("0")) <= 19 and int(raw) <= MAX_EVENT_ID
    if raw in TIMES:
        return raw in TIMES[:5]
    return None  # some other string: the design only says it must be a time with a zone


def _seconds(raw: str) -> bool | None:
    try:
        value = float(raw)
    except ValueError:
        return False
    if raw.strip() != raw or "_" in raw or not raw.isascii():
        return None  # float() reads these; the design says only "SECONDS"
    return 0 <= value <= 86400


def _boolean(raw: str) -> bool | None:
    if raw in BOOLS:
        return True
    return None if raw.lower() in BOOLS else False


def query_verdict(route: Route, query: str) -> bool | None:
    """Whether every query value the route reads is in its range (True), one is not
    (False), or the design does not settle it (None)."""
    values = dict(parse_qsl(query))
    checks: dict[str, Any] = {}
    if route.kind == "logs":
        checks = {"tail": lambda v: _whole(v, 0, 2000) or (None if _whole(v, 0, 10**30) else False)}
        checks["follow"] = _boolean
    elif route.kind == "events":
        checks = {"since": _since, "limit": lambda v: _whole(v, 1, 1000), "follow": _boolean}
    elif route.kind == "verb":
        checks = {"wait": _boolean, "timeout": _seconds}
    verdicts = [check(values[key]) for key, check in checks.items() if key in values]
    if False in verdicts:
        return False
    return None if None in verdicts else True


def check_answer(method: str, target: str, answer: Answer, *, sane: bool) -> None:
    """The property for one request and its answer (see the module's docstring); `sane`:
    the request was well-formed HTTP, so the listener itself has nothing to refuse."""
    route = control_route(target)
    query = urlsplit(target).query
    event(f"{answer.status} {route.kind if route else None}")
    if method == "HEAD":  # never served: a GET route's HEAD is 405 (its body not sent)
        expected = 404 if route is None else 405
        assert answer.status == expected or (not sane and answer.status in (400, 413)), answer
        return
    if answer.body is None:  # a stream: only a follow of a reader, in range
        assert answer.status == 200 and route is not None, (answer, target)
        assert route.kind in ("logs", "events") and "follow" in dict(parse_qsl(query)), target
        assert query_verdict(route, query) is not False, target
        return
    try:
        payload = json.loads(answer.body)
    except ValueError:
        assert route is not None and route.kind == "metrics" and answer.status == 200, answer
        return
    error = payload.get("error") if isinstance(payload, dict) else None
    if error is None:
        assert answer.status in (200, 202), answer
        assert route is not None and method == route.method, (method, target)
        assert answer.status == 200 or route.kind == "verb", answer
        if route.name is not None:
            assert route.name in NAMES, target
        assert query_verdict(route, query) is not False, f"{target} was not refused"
        return
    code = error.get("code")
    assert isinstance(error.get("message"), str) and error["message"], payload
    assert code in STATUSES, f"code {code!r} is not in the closed set"
    assert answer.status == STATUSES[code] or (answer.status, code) == (408, "bad_request")
    if not sane:
        return
    assert answer.status != 408, answer  # a whole request came at once
    if code == "not_found":
        assert route is None, target
    elif code == "method_not_allowed":
        assert route is not None and method != route.method, (method, target)
    elif code == "model_not_found":
        assert route is not None and route.name not in NAMES, target
    elif code == "bad_request":
        assert route is not None and query_verdict(route, query) is not True, target


async def _still_serves(run: Running) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(run.control_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://vllmd", timeout=5) as http:
        status = await http.get("/v1/status")
    assert status.status_code == 200 and status.json()["pid"], status.text


def _request(method: str, target: str, body: bytes, extra: list[bytes]) -> bytes:
    head = [f"{method} {target} HTTP/1.1".encode(), b"host: vllmd", *extra]
    if not any(
        line.lower().startswith((b"content-length", b"transfer-encoding")) for line in extra
    ):
        head.append(b"content-length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


BROKEN_HEADERS = [
    b"content-length: 99999999999999999999",
    b"content-length: " + b"9" * 5000,
    b"content-length: 5, 5",
    b"content-length: 5\r\ncontent-length: 6",
    b"content-length: -1",
    b"content-length: 70000",
    b"transfer-encoding: chunked",
    b"transfer-encoding: gzip",
    b"expect: 100-continue",
    b"x-long: " + b"v" * 70_000,
    b"bad name: x",
    b"connection: upgrade",
    b"upgrade: h2c",
]
BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=32),
    st.builds(
        lambda v: json.dumps(v).encode(),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    ),
)


@given(
    target=targets(),
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "FOO"]),
    right_method=st.integers(0, 2),
    body=BODIES,
    broken=st.lists(st.sampled_from(BROKEN_HEADERS), max_size=2, unique=True),
    sane=st.integers(0, 3),
)
async def test_raw_control_requests_get_only_documented_answers(
    daemon: Running,
    target: str,
    method: str,
    right_method: int,
    body: bytes,
    broken: list[bytes],
    sane: int,
) -> None:
    """Any request on the control socket: a documented answer, as the design routes it,
    and the daemon serves on."""
    if right_method:
        method = method_for(target)  # mostly the route's own method: the handler is reached
    extra = broken if not sane else []
    wire = _request(method, target, body, extra)
    with anyio.fail_after(ANSWER_TIMEOUT):
        async with await anyio.connect_unix(str(daemon.control_socket)) as stream:
            try:
                answer = await exchange(stream, wire, head_only=method == "HEAD", eof=True)
            except NoAnswer as exc:
                pytest.fail(f"no answer to {wire[:300]!r}: {exc}")
    check_answer(method, target, answer, sane=not extra)
    await _still_serves(daemon)


@given(target=targets(), body=BODIES)
async def test_control_requests_through_httpx_get_only_documented_answers(
    daemon: Running, target: str, body: bytes
) -> None:
    """Requests as a client library writes them, each with its route's method: the same
    property, and a follow's stream closed after its head."""
    method = method_for(target)
    transport = httpx.AsyncHTTPTransport(uds=str(daemon.control_socket))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://vllmd", timeout=ANSWER_TIMEOUT
    ) as http:
        with anyio.fail_after(ANSWER_TIMEOUT):
            async with http.stream(method, target, content=body) as response:
                sent = response.request.url.raw_path.decode("ascii")
                whole = "content-length" in response.headers
                data = await response.aread() if whole else None
    answer = Answer(response.status_code, dict(response.headers), data)
    check_answer(method, sent, answer, sane=True)
    await _still_serves(daemon)


# Regression, found by the long fuzz run: a HEAD request the listener refused as too large by
# its content-length got no answer at all (the 413 was sent with its body, h11 refused it, and
# the connection was dropped):
# b"HEAD /v1/status HTTP/1.1\r\nhost: vllmd\r\ncontent-length: 99999999999999999999\r\n\r\n"
# The 408 branch sent the same way. Both now send the head only.
async def test_head_refused_as_too_large_gets_its_413(daemon: Running) -> None:
    """The listener's 413 body_too_large reaches a HEAD request too (its head only)."""
    for length in (b"99999999999999999999", b"70000"):
        wire = b"HEAD /v1/status HTTP/1.1\r\nhost: vllmd\r\ncontent-length: " + length
        with anyio.fail_after(ANSWER_TIMEOUT):
            async with await anyio.connect_unix(str(daemon.control_socket)) as stream:
                try:
                    answer = await exchange(stream, wire + b"\r\n\r\n", head_only=True, eof=True)
                except NoAnswer as exc:
                    pytest.fail(f"no answer to a HEAD with content-length {length!r}: {exc}")
        assert answer.status == 413, answer
    await _still_serves(daemon)


async def test_head_with_a_malformed_body_gets_its_400(daemon: Running) -> None:
    """Review of the fix above: the 400 for a malformed body sent its body to a HEAD request
    too (h11 refused it, and the connection was dropped with no answer)."""
    wire = b"HEAD /v1/status HTTP/1.1\r\nhost: vllmd\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
    with anyio.fail_after(ANSWER_TIMEOUT):
        async with await anyio.connect_unix(str(daemon.control_socket)) as stream:
            try:
                answer = await exchange(stream, wire, head_only=True, eof=True)
            except NoAnswer as exc:
                pytest.fail(f"no answer to a HEAD with a malformed chunked body: {exc}")
    assert answer.status == 400, answer
    await _still_serves(daemon)
