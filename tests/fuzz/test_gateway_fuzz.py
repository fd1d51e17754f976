"""Property-based fuzzing of the gateway's request parsing and routing (docs/design.md
"Gateway"), against one daemon with fake engines for the whole module.

The property: whatever a client sends, the daemon answers with a documented status only:
an error in OpenAI's shape with a code of the closed set (vllmd/gateway/errors.py) at its
status, one of the HTTP server's own plain 400/431/503, a GET route's own answer, or (only
for a request the design says is forwarded) the engine's; routing agrees with the design;
and afterwards GET /health is still 200. Malformed requests are written as raw bytes;
well-formed ones go through httpx.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import anyio
import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz import weighted
from tests.fuzz.wire import Answer, NoAnswer, exchange
from tests.integration.harness import fake_config, running
from vllmd.daemon import Running
from vllmd.gateway.errors import STATUSES
from vllmd.gateway.routes import MODEL_ROUTES

pytestmark = pytest.mark.anyio

ANSWER_TIMEOUT = 10.0  # a forward that starts an engine included
MAX_BODY = 256 * 1024
MODELS: dict[str, dict[str, Any]] = {"a": {"aliases": ["org/a-alias", "short"]}, "b": {}}
# Every name a request may use for a model: in a body, names and aliases; in a path, an
# alias without `/` (docs/design.md "Model routes").
BODY_NAMES = frozenset({"a", "org/a-alias", "short", "b"})
PATH_NAMES = frozenset({"a", "short", "b"})
GET_ROUTES = frozenset({"/health", "/ready", "/metrics", "/metrics/engines", "/v1/models"})
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error"}
ERROR_TYPES |= {s: "invalid_request_error" for s in (404, 405, 408, 413)}
CODES = {code.value: status for code, status in STATUSES.items()}


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    tmp = tmp_path_factory.mktemp("gw")
    # A short body timeout: a request that promises more body than it sends costs little.
    limits = {"client_body_timeout": "300ms", "max_body": MAX_BODY}
    async with running(fake_config(tmp, MODELS, gateway=limits)) as run:
        yield run


# --- what is sent -------------------------------------------------------------------------

SEGMENTS = [
    *("v1", "models", "chat", "completions", "embeddings", "responses", "rerank", "score"),
    *("tokenize", "detokenize", "health", "ready", "metrics", "engines", "sleep", "wake_up"),
    *("collective_rpc", "a", "b", "short", "org", "a-alias", "nope", "A", "..", ".", ""),
    *("%2e%2e", "%2E", "%2f", "%2F", "org%2Fa-alias", "%00", "%ff", "%C3%A9", "%", "%zz", "%25"),
    *("\u00e9", "\u4e2d", "\U0001f600", "a b", "a;b", "a?b", "a#b", "~", "*"),
]


def _encode(text: str) -> str:
    return quote(text, safe="/%?#;~*")


@st.composite
def paths(draw: st.DrawFn) -> str:
    """A request target: a model route (bare or under /models/NAME), a GET route, or any
    mix of segments, with percent-escapes, `..`, `//`, unicode (sent as UTF-8) and a query."""
    name = draw(st.sampled_from(sorted(BODY_NAMES | {"nope", "org%2Fa-alias", "", "..", "A"})))
    route = draw(st.sampled_from([*MODEL_ROUTES, *sorted(GET_ROUTES), "/v1/models/" + name]))
    segments = st.one_of(st.sampled_from(SEGMENTS), st.text(max_size=6).map(_encode))
    shape = weighted(draw, (4, "route"), (3, "under"), (2, "segments"), (2, "prefix"))
    if shape == "route":
        path = route
    elif shape == "under":
        path = f"/models/{name}{route}"
    else:
        parts = draw(st.lists(segments, max_size=6))
        path = "/" + "/".join(parts)
        if shape == "prefix":
            path = draw(st.sampled_from(["", "/v1", f"/models/{name}", "/models"])) + path
    suffixes = ["/", "?", "?model=a", "?a=%ff&b", "#frag", "//", "/.", "/..", "%2F", "%2e"]
    suffix = weighted(draw, (10, ""), (5, draw(st.sampled_from(suffixes))))
    return str(path + suffix)


def _nested(depth: int) -> bytes:
    return b'{"model": "a", "x": ' + b"[" * depth + b"]" * depth + b"}"


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    _containers,
    max_leaves=8,
)
MODEL_VALUES = st.one_of(
    st.sampled_from(sorted(BODY_NAMES | {"", "nope", "A", "a ", "org%2Fa-alias"})), JSON
)


@st.composite
def objects(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = draw(st.dictionaries(st.text(max_size=6), JSON, max_size=3))
    model = weighted(draw, (3, st.sampled_from(sorted(BODY_NAMES))), (1, MODEL_VALUES), (1, None))
    if model is not None:
        body["model"] = draw(model)
    if draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": draw(st.text(max_size=20))}]
        body["max_tokens"] = draw(st.integers(min_value=-5, max_value=5))
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return body


def _json_bytes(value: object, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


BODIES = st.one_of(
    st.builds(_json_bytes, objects(), st.booleans()),
    st.builds(_json_bytes, objects(), st.booleans()),
    st.builds(_json_bytes, objects(), st.booleans()),
    st.builds(_json_bytes, JSON, st.booleans()),  # mostly no object at all
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b'"a"',
            b'{"model": "a"',
            b'{"model": "a"}garbage',
            b' {"model": "a"} ',
            b'\xef\xbb\xbf{"model": "a"}',
            b'{"model": "a", "x": "\xff\xfe"}',
            b'{"model": "\xc3"}',
            '{"model": "a"}'.encode("utf-16"),
            b'{"model": "a", "n": 1e999999}',
            b'{"model": "a", "n": -1e999999, "m": NaN, "k": Infinity}',
            b'{"model": "a", "n": ' + b"9" * 5000 + b"}",
            b'{"model": "a", "n": ' + b"9" * 4000 + b"}",
            b'{"model": "a", "x": "\\ud800"}',
            b'{"model": "a", "model": "nope"}',
            b'{"model": "nope", "model": "a"}',
        ]
    ),
    st.sampled_from([10, 500, 900, 980, 990, 995, 998, 999, 1000, 1100, 5000, 60_000]).map(_nested),
    st.binary(max_size=64),
)

CONTENT_LENGTHS = ["abc", "-1", "9" * 30, "1 2", " 5", "+5", "0x10", "5,5", "", "\u0665"]
OTHER_HEADERS: list[tuple[str, str]] = [
    ("expect", "100-continue"),
    ("expect", "nothing"),
    ("connection", "upgrade"),
    ("upgrade", "h2c"),
    ("upgrade", "websocket"),
    ("connection", "close"),
    ("connection", "keep-alive"),
    ("authorization", "Bearer sk-x"),
    ("authorization", "Basic Zm9vOmJhcg=="),
    ("authorization", ""),
    ("x-request-id", "fuzz-1"),
    ("x-request-id", "\u00e9" * 3),
    ("host", "localhost"),
    ("host", ""),
    ("content-type", "application/json"),
    ("transfer-encoding", "gzip"),
    ("transfer-encoding", "identity"),
    ("x-junk", "a\x00b"),
    ("bad name", "x"),
    ("x-long", "v" * 70_000),
]


@dataclass
class Raw:
    method: str
    target: str
    version: str
    framing: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)

    def wire(self) -> bytes:
        head = [f"{self.method} {self.target} {self.version}".encode()]
        body, framing = self.body, self.framing
        if framing == "length":
            head.append(b"content-length: %d" % len(body))
        elif framing == "short":
            head.append(b"content-length: %d" % max(len(body) - 1, 0))
        elif framing == "long":
            head.append(b"content-length: %d" % (len(body) + 3))
        elif framing == "twice":
            head += [b"content-length: %d" % len(body), b"content-length: %d" % (len(body) + 1)]
        elif framing.startswith("cl="):
            head.append(b"content-length: " + framing[3:].encode())
        elif framing in ("chunked", "chunked+length"):
            head.append(b"transfer-encoding: chunked")
            if framing == "chunked+length":
                head.append(b"content-length: %d" % len(body))
            half = len(body) // 2
            parts = [p for p in (body[:half], body[half:]) if p]
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        elif framing == "chunked-raw":
            head.append(b"transfer-encoding: chunked")
        head += [f"{k}: {v}".encode() for k, v in self.headers]
        return b"\r\n".join(head) + b"\r\n\r\n" + body

    @property
    def whole(self) -> bool:
        """The body the gateway reads is exactly `body` (framed by a good length or chunks)."""
        chunked_ok = self.framing == "chunked" and self.version == "HTTP/1.1"
        te = [v for k, v in self.headers if k == "transfer-encoding"]
        version_ok = self.version in ("HTTP/1.1", "HTTP/1.0")
        return (self.framing == "length" or chunked_ok) and version_ok and not te


@st.composite
def raw_requests(draw: st.DrawFn) -> Raw:
    """A request, sane in most of its parts and broken in a few: each part is sane with
    odds of about 4 to 1."""
    method = weighted(
        draw, (6, "POST"), (2, "GET"), (1, "HEAD"), (1, draw(st.sampled_from(METHODS)))
    )
    target = weighted(draw, (12, draw(paths())), (1, draw(st.sampled_from(TARGETS))))
    version = weighted(draw, (8, "HTTP/1.1"), (1, draw(st.sampled_from(VERSIONS))))
    framing = weighted(draw, (8, "length"), (4, "chunked"), (2, draw(st.sampled_from(FRAMINGS))))
    headers = weighted(
        draw, (2, []), (2, draw(st.lists(st.sampled_from(OTHER_HEADERS), max_size=3, unique=True)))
    )
    return Raw(method, target, version, framing, draw(BODIES), headers)


METHODS = ["PUT", "DELETE", "OPTIONS", "PATCH", "FOO", "get", "CONNECT", "TRACE", "PRI"]
TARGETS = ["*", "", "http://x/v1/completions", "/a b", "/\u00e9", "v1/completions", "/%"]
VERSIONS = ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/1", "http/1.1", "HTTP/1.1 x"]
FRAMINGS = ["none", "short", "long", "twice", "chunked+length", "chunked-raw"]
FRAMINGS += [f"cl={v}" for v in CONTENT_LENGTHS]


# --- what may come back --------------------------------------------------------------------


def target_path(target: str) -> str | None:
    """The path of a request target as sent: origin-form, or absolute-form (which a server
    must accept, RFC 9112 3.2.2); None for any other form."""
    if target.startswith(("http://", "https://")):
        return urlsplit(target).path
    if target.startswith("/"):
        return target.split("?", 1)[0].split("#", 1)[0]
    return None


def model_route(method: str, target: str) -> tuple[str, str | None] | None:
    """The design's routing, read from docs/design.md: the route a request is forwarded as
    and the model its path names (None: the body's), or None when it is no model route."""
    raw = target_path(target)
    if method != "POST" or raw is None:
        return None
    if "%2f" in raw.lower():
        return None  # an encoded `/`
    path = unquote(raw)
    if path in MODEL_ROUTES:
        return path, None
    if path.startswith("/models/"):
        name, _, rest = path[len("/models/") :].partition("/")
        if "/" + rest in MODEL_ROUTES and name not in ("", ".", ".."):
            return "/" + rest, name
    return None


def get_route(method: str, target: str) -> bool:
    raw = target_path(target)
    if method not in ("GET", "HEAD") or raw is None:
        return False
    path = unquote(raw)
    return path in GET_ROUTES or path.startswith("/v1/models/")


def reaches_engine(raw: Raw) -> bool:
    """Whether the design has this request forwarded to an engine (whose answer is then
    relayed as it is)."""
    hit = model_route(raw.method, raw.target)
    if hit is None or not raw.whole or len(raw.body) > MAX_BODY:
        return False
    try:
        payload = json.loads(raw.body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(payload, dict):
        return False
    if hit[1] is not None:
        return hit[1] in PATH_NAMES
    model = payload.get("model")
    return isinstance(model, str) and model in BODY_NAMES


def known_model(raw: Raw) -> bool:
    """Whether the model a request names, in its path or its body, exists."""
    hit = model_route(raw.method, raw.target)
    if hit is not None and hit[1] is not None:
        return hit[1] in PATH_NAMES
    if hit is not None:
        try:
            payload = json.loads(raw.body)
        except (ValueError, RecursionError):
            return False
        model = payload.get("model") if isinstance(payload, dict) else None
        return isinstance(model, str) and model in BODY_NAMES
    return unquote(target_path(raw.target) or "")[len("/v1/models/") :] in BODY_NAMES


def error_code(answer: Answer) -> str | None:
    """The `error.code` of an answer in OpenAI's error shape, if it is one."""
    try:
        payload = json.loads(answer.body or b"")
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def check_error(answer: Answer) -> str | None:
    """The code of a gateway error answer, checked against the closed set; None when the
    answer is no error of the gateway's."""
    code = error_code(answer)
    if code is None:
        return None
    payload = json.loads(answer.body or b"")
    error = payload["error"]
    assert set(payload) == {"error"}, payload
    assert set(error) == {"message", "type", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert code in CODES, f"code {code!r} is not in the closed set"
    assert answer.status == CODES[code], (answer.status, code)
    assert error["type"] == ERROR_TYPES.get(answer.status, "server_error"), error
    if answer.status == 503:
        assert int(answer.headers["retry-after"]) >= 1, answer.headers
    return code


def check_answer(raw: Raw, answer: Answer) -> None:
    """The property for one request and its answer (see the module's docstring)."""
    if answer.plain:
        event(f"plain {answer.status}")
        # A plain 500 is an app that failed before it answered: a bug.
        assert answer.status in (400, 431, 503), f"the server's own {answer.status}"
        return
    forwarded = reaches_engine(raw)
    event(f"{'forwarded ' if forwarded else ''}{answer.status}")
    if raw.method == "HEAD":
        if get_route(raw.method, raw.target):
            assert answer.status in (200, 404, 503), answer
        else:
            assert answer.status in (404, 400, 413, 408), answer
        return
    if forwarded:
        # The engine's answer as it sent it (in any shape), or one of the gateway's errors
        # for what stopped it on the way, which cannot be one of the refusals before it.
        code = error_code(answer)
        if code in CODES:
            check_error(answer)
        assert code not in ("not_found", "invalid_request", "model_not_found"), code
        return
    code = check_error(answer)
    if code is None:
        # No error of the gateway's and not forwarded: one of its own GET routes.
        assert get_route(raw.method, raw.target), (raw.method, raw.target, answer)
        path = unquote(target_path(raw.target) or "")
        assert answer.status == 200 or (path == "/ready" and answer.status == 503), answer
        return
    if code == "not_found":
        assert model_route(raw.method, raw.target) is None, raw.target
        assert not get_route(raw.method, raw.target), raw.target
    elif code == "model_not_found" and raw.whole:
        assert not known_model(raw), raw


async def _still_serves(run: Running) -> None:
    async with httpx.AsyncClient(base_url=run.gateway_url, timeout=5) as http:
        health = await http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def _address(run: Running) -> tuple[str, int]:
    netloc = urlsplit(run.gateway_url)
    assert netloc.hostname is not None and netloc.port is not None
    return netloc.hostname, netloc.port


@given(raw=raw_requests())
async def test_raw_requests_get_only_documented_answers(gateway: Running, raw: Raw) -> None:
    """Any bytes of a request: a documented answer, routed as the design says, and the
    daemon serves on."""
    host, port = _address(gateway)
    with anyio.fail_after(ANSWER_TIMEOUT):
        async with await anyio.connect_tcp(host, port) as stream:
            try:
                answer = await exchange(stream, raw.wire(), head_only=raw.method == "HEAD")
            except NoAnswer as exc:
                pytest.fail(f"no answer to {raw.wire()[:300]!r}: {exc}")
    check_answer(raw, answer)
    await _still_serves(gateway)


WELL_FORMED_PATHS = st.one_of(
    st.sampled_from(MODEL_ROUTES),
    st.sampled_from(MODEL_ROUTES),
    st.builds(
        "/models/{}{}".format,
        st.sampled_from(sorted(BODY_NAMES | {"nope"})),
        st.sampled_from(MODEL_ROUTES),
    ),
    st.sampled_from(
        sorted(GET_ROUTES | {"/v1/models/a", "/v1/models/org/a-alias", "/v1/models/nope"})
    ),
    st.lists(
        st.sampled_from([s for s in SEGMENTS if "%" not in s and s not in (".", "..")]), max_size=4
    ).map(lambda parts: "/" + "/".join(parts)),
)


@given(
    method=st.sampled_from(["POST"] * 5 + ["GET", "GET", "HEAD", "PUT", "DELETE", "OPTIONS"]),
    path=WELL_FORMED_PATHS,
    body=st.one_of(objects().map(lambda o: _json_bytes(o, True)), BODIES),
    authorization=st.sampled_from([None, "Bearer sk-x", "Bearer sk-", "Token x"]),
)
async def test_well_formed_requests_get_only_documented_answers(
    gateway: Running, method: str, path: str, body: bytes, authorization: str | None
) -> None:
    """Requests as httpx writes them (length-framed, paths normalised): the same property."""
    headers = {"authorization": authorization} if authorization is not None else {}
    async with (
        httpx.AsyncClient(base_url=gateway.gateway_url, timeout=ANSWER_TIMEOUT) as http,
        http.stream(method, path, content=body, headers=headers) as response,
    ):
        sent_path = response.request.url.raw_path.decode("ascii")
        read = response.headers.get("content-length") is not None and method != "HEAD"
        data = await response.aread() if read else None
    raw = Raw(method, sent_path, "HTTP/1.1", "length", body)
    answer = Answer(response.status_code, dict(response.headers), data)
    check_answer(raw, answer)
    await _still_serves(gateway)
