"""The gateway's route matching, error mapping and stream-error framing, without a server."""

from __future__ import annotations

import urllib.parse

import pytest
from prometheus_client import CollectorRegistry

from vllmd.errors import (
    DeviceError,
    InsufficientMemory,
    InvalidState,
    ModelFailed,
    ModelNotFound,
    ModelUnavailable,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    StartFailed,
    VllmdError,
)
from vllmd.gateway.errors import REJECT_REASONS, STATUSES, Code, http_error
from vllmd.gateway.proxy import sse_event_end
from vllmd.gateway.routes import MODEL_ROUTES, OTHER, match
from vllmd.metrics import Metrics


def _match(raw: str) -> tuple[str, str | None] | None:
    """As uvicorn hands a request target to the app: decoded `path`, undecoded `raw_path`."""
    raw_path = raw.partition("?")[0]
    return match(urllib.parse.unquote(raw_path), raw_path.encode())


@pytest.mark.parametrize("route", MODEL_ROUTES)
def test_every_model_route_matches_bare_and_under_a_model(route: str) -> None:
    assert _match(route) == (route, None)
    assert _match(f"/models/qwen2.5{route}") == (route, "qwen2.5")
    assert _match(f"/models/qwen2%2e5{route}") == (route, "qwen2.5")  # compared decoded


@pytest.mark.parametrize(
    "target",
    [
        "/collective_rpc",
        "/sleep",
        "/v1/../collective_rpc",
        "/models/m/v1/../collective_rpc",
        "/models/m/v1/%2e%2e/collective_rpc",
        "/models/m/v1/%2E%2E/sleep",
        "/models/m/v1/%252e%252e/sleep",
        "/models/m/x/../../collective_rpc",
        "/models/m/collective_rpc",
        "/models/m/v1/models",
        "/v1/chat/completions/",
        "/v1//chat/completions",
        "/v1/./chat/completions",
        "//v1/chat/completions",
        "/v1%2fchat/completions",
        "/v1%2Fchat/completions",
        "/models/m%2fv1/chat/completions",
        "/models/m/v1/chat%2Fcompletions",
        "/models//v1/chat/completions",
        "/models/./v1/chat/completions",
        "/models/../v1/chat/completions",
        "/models/%2e%2e/v1/chat/completions",
        "/models/m//v1/chat/completions",
        "/models/m/./v1/chat/completions",
        "/models/m/v1/tokenize",
        "/v1/tokenize",
        "/models/m",
        "/models/",
        "/models",
        "/",
        "",
    ],
)
def test_anything_else_matches_nothing(target: str) -> None:
    assert _match(target) is None


def test_a_missing_raw_path_is_matched_on_the_path_alone() -> None:
    assert match("/v1/completions", None) == ("/v1/completions", None)


@pytest.mark.parametrize(
    ("error", "code", "retry_after"),
    [
        (ModelFailed("m failed"), "model_failed", 60),
        (QueueFull("full", retry_after=12), "queue_full", 12),
        (QueueTimeout("slow"), "queue_timeout", 5),
        (InsufficientMemory("too big", retry_after=30), "insufficient_memory", 30),
        (ShuttingDown(), "shutting_down", 5),
        (ModelUnavailable("no"), "model_unavailable", 5),
    ],
)
def test_every_503_carries_retry_after(error: VllmdError, code: str, retry_after: float) -> None:
    answer = http_error(error)
    assert (answer.status, answer.code, answer.retry_after) == (503, code, retry_after)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ModelNotFound("x"), 404, "model_not_found"),
        (StartFailed("exit 3"), 502, "start_failed"),
        (VllmdError("bug"), 500, "internal_error"),
    ],
)
def test_other_errors_map_to_their_status_without_retry_after(
    error: VllmdError, status: int, code: str
) -> None:
    answer = http_error(error)
    assert (answer.status, answer.code, answer.retry_after) == (status, code, None)


@pytest.mark.parametrize(
    ("sent", "end"),
    [
        (b"", b""),
        (b'data: {"a": 1}\n\n', b""),
        (b'data: {"a": 1}\n', b"\n"),
        (b'data: {"a"', b"\n\n"),
    ],
)
def test_a_stream_error_starts_its_own_event(sent: bytes, end: bytes) -> None:
    """An engine that dies mid-event must not have the error appended to its half event."""
    assert sse_event_end(sent) == end


def test_request_series_are_bounded_by_their_labels() -> None:
    metrics = Metrics(CollectorRegistry())
    for i in range(500):
        metrics.request("", OTHER, 404, 0.001 * i)
    metrics.request("m", "/v1/completions", 200, 0.1)
    r = metrics.registry
    labels = {"model": "", "endpoint": OTHER, "code": "404"}
    assert r.get_sample_value("vllmd_requests_total", labels) == 500
    series = {
        tuple(sorted(s.labels.items()))
        for family in r.collect()
        if family.name == "vllmd_requests"
        for s in family.samples
        if s.name == "vllmd_requests_total"
    }
    assert len(series) == 2


def test_every_gateway_code_has_one_status() -> None:
    assert set(STATUSES) == set(Code)
    assert all(STATUSES[code] == 503 for code in REJECT_REASONS)


def test_every_unavailable_error_keeps_its_own_code() -> None:
    """Each ModelUnavailable of vllmd.errors answers with its own code of the closed set,
    not the generic one: a new subclass gets a Code or this fails."""
    import vllmd.errors

    kinds = [
        cls
        for cls in vars(vllmd.errors).values()
        if isinstance(cls, type) and issubclass(cls, ModelUnavailable)
    ]
    assert len(kinds) >= 6
    for cls in kinds:
        assert Code(cls.code) in STATUSES, cls


def test_the_gateway_answers_errors_only_from_its_closed_set() -> None:
    """No module of the gateway builds an HTTPError itself (a string-literal code): every
    error goes through gateway_error / http_error, the one mapping to HTTP."""
    import ast
    from pathlib import Path

    import vllmd.gateway

    found = []
    for path in Path(vllmd.gateway.__file__).parent.glob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "HTTPError":
                found.append(f"{path.name}:{node.lineno}")
    assert found == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidState("unloaded while it waited"), Code.INVALID_STATE),
        (DeviceError("probe"), Code.INTERNAL_ERROR),
    ],
)
def test_other_vllmd_errors_are_500s_of_the_closed_set(error: VllmdError, code: Code) -> None:
    answer = http_error(error)
    assert (answer.status, answer.code) == (500, code)
