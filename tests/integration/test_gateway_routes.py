"""What the gateway forwards to an engine, and what it never does (through the whole daemon).

The engines run in sleep mode with vLLM's dev-mode routes on (`/sleep`, `/collective_rpc`, ...)
on the socket the gateway proxies to: no client path may reach them. Requests are written as
raw bytes, because httpx normalises `..` and percent-escapes away before they hit the wire.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from tests.integration.harness import client, eventually, fake_config, running
from vllmd.config import Config
from vllmd.devices import DeviceSnapshot
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio

GiB = 2**30
MODEL_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/v1/score",
    "/tokenize",
    "/detokenize",
)
# vLLM's routes besides the model routes: dev mode's (sleep mode on), LoRA, profiling and the
# engine's own probes. None may be reached through the gateway.
ENGINE_ONLY_ROUTES = (
    "/sleep",
    "/sleep?level=1",
    "/wake_up",
    "/wake_up?tags=weights",
    "/is_sleeping",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/pause",
    "/resume",
    "/is_paused",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/server_info",
    "/load_lora_adapter",
    "/unload_lora_adapter",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/start_profile",
    "/stop_profile",
    "/update_weights",
    "/metrics",
    "/health",
    "/ping",
    "/version",
    "/invocations",
    "/v1/models",
    "/v1/models/m",
)
# The gateway answers these itself (they are its own GET routes), never from an engine.
GATEWAY_GET_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/models/m"}


def path_forms(route: str, name: str) -> list[str]:
    """Every way a client might try to write `route` so that it reaches `name`'s engine."""
    bare = route.lstrip("/")
    return [
        route,
        f"/{bare}/",
        f"//{bare}",
        f"/./{bare}",
        f"/v1/..{route}",
        f"/v1/%2e%2e{route}",
        f"/v1/chat/completions/..{route}",
        f"/v1/chat/completions/../..{route}",
        f"/models/{name}{route}",
        f"/models/{name}{route}/",
        f"/models/{name}{route}?model={name}",
        f"/models/{name}/{bare}?level=1",
        f"/models/{name}//{bare}",
        f"/models/{name}/./{bare}",
        f"/models/{name}/.{route}",
        f"/models/{name}/..{route}",
        f"/models/{name}/v1/..{route}",
        f"/models/{name}/v1/%2e%2e{route}",
        f"/models/{name}/v1/%2E%2E{route}",
        f"/models/{name}/v1/.%2e{route}",
        f"/models/{name}/v1/%2e.{route}",
        f"/models/{name}/v1/%252e%252e{route}",
        f"/models/{name}/v1%2f..%2f{bare}",
        f"/models/{name}/v1%2F..%2F{bare}",
        f"/models/{name}/x/../..{route}",
        f"/models/{name}/v1/chat/completions/../..{route}",
        f"/models/{name}/v1/chat/completions/%2e%2e/%2e%2e{route}",
        f"/models/{name}/tokenize/..{route}",
        f"/models/{name}%2f..{route}",
        f"/models/%2e%2e{route}",
        f"/models/..{route}",
        f"/models/.{route}",
        f"/models/{name}/%2e%2e/%2e%2e{route}",
        f"/models{route}",
        f"/models/{name}/models/{name}{route}",
    ]


# Paths that decode (or normalise) to a forwarded route but are not written as one.
DISGUISED_MODEL_ROUTES = [
    "/v1/chat/completions/",
    "/v1//chat/completions",
    "/v1/chat/./completions",
    "/v1/x/../chat/completions",
    "/v1%2fchat/completions",
    "/v1%2Fchat%2Fcompletions",
    "//v1/chat/completions",
    "/models/m/v1/chat/completions/",
    "/models/m%2fv1/chat/completions",
    "/models/m/v1%2Fchat/completions",
    "/models/m/v1//chat/completions",
    "/models/m//v1/chat/completions",
    "/models//v1/chat/completions",
    "/models/./v1/chat/completions",
    "/models/../v1/chat/completions",
    "/models/%2e%2e/v1/chat/completions",
    "/models/m/./v1/chat/completions",
    "/models/m/x/../v1/chat/completions",
    "/models/m/tokenize/",
    "/models/m/v1/tokenize",
    "/v1/tokenize",
    "/models/m/v1",
    "/models/m/",
    "/models/m",
    "/models/",
]


class OneGpu:
    """A 20 GiB GPU, so the fake engines run with --enable-sleep-mode and dev-mode routes."""

    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        gpu = DeviceSnapshot(
            name="0", kind="gpu", uuid="GPU-fake-0", index=0, total=20 * GiB, used=0,
            free=20 * GiB, utilization=0.0, temperature=40.0, power=100.0, processes=(),
            up=True, error=None,
        )  # fmt: skip
        return {"0": gpu}


def gpu_config(tmp_path: Path, events: Path) -> Config:
    env = {"FAKE_EVENTS_FILE": str(events)}
    models = {"m": {"devices": ["0"], "memory": "8GiB", "env": env, "aliases": ["m-alias"]}}
    return fake_config(tmp_path, models, devices={})


async def raw_request(
    base_url: str, method: str, target: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly `target` on the wire; (status, headers, body)."""
    url = httpx.URL(base_url)
    assert url.host and url.port
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {url.host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    data = b""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(url.host, url.port) as stream:
            await stream.send(head.encode("ascii") + body)
            while True:
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head_bytes, _, content = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, content


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_engine_only_routes_are_404_in_every_path_form_and_never_reach_an_engine(
    tmp_path: Path,
) -> None:
    """Regression: `POST /models/m/v1/%2e%2e/collective_rpc` reached the engine as
    `POST /collective_rpc` (uvicorn decodes the path, httpx drops `..`)."""
    events = tmp_path / "events"
    async with running(gpu_config(tmp_path, events), probe=OneGpu()) as run:
        body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 1, "method": "sleep"})
        status, _, _ = await raw_request(run.gateway_url, "POST", "/v1/completions", body.encode())
        assert status == 200  # the engine runs and its event file is written
        assert "request /v1/completions -" in _lines(events)
        before = _lines(events)

        tried: list[tuple[str, str, int, bytes]] = []
        targets = [form for route in ENGINE_ONLY_ROUTES for form in path_forms(route, "m")]
        targets += [
            form for route in ("/sleep", "/collective_rpc") for form in path_forms(route, "m-alias")
        ]
        targets += DISGUISED_MODEL_ROUTES
        for target in targets:
            for method in ("GET", "POST"):
                if method == "GET" and target in GATEWAY_GET_ROUTES:
                    continue
                status, _, content = await raw_request(
                    run.gateway_url, method, target, body.encode()
                )
                tried.append((method, target, status, content))

        wrong = []
        for method, target, status, content in tried:
            # GET /v1/models/{id} is the gateway's own listing (ids may hold `/`).
            own_listing = method == "GET" and target.startswith("/v1/models/")
            try:
                error = json.loads(content)["error"]
                ok = (
                    status == 404
                    and error["code"] == ("model_not_found" if own_listing else "not_found")
                    and error["message"]
                    and error["type"]
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                wrong.append(f"{method} {target} -> {status} {content[:120]!r}")
        assert not wrong, "\n".join(wrong)

        # A last legitimate request: anything forwarded above was logged before it.
        async with client(run) as http:
            r = await http.post(
                "/v1/completions",
                json={"model": "m", "prompt": "x", "max_tokens": 1},
                headers={"X-Request-Id": "sentinel"},
            )
        assert r.status_code == 200
        await eventually(lambda: "request /v1/completions sentinel" in _lines(events))
        assert _lines(events) == [*before, "request /v1/completions sentinel"]
        assert run.supervisor.instances["m"].state is InstanceState.READY
    assert len(tried) > 1000


async def test_every_model_route_is_forwarded_by_body_and_by_path(tmp_path: Path) -> None:
    """All eight routes reach the engine under their own path, in both forms (the path form
    of /tokenize and /detokenize was a 404)."""
    events = tmp_path / "events"
    async with running(gpu_config(tmp_path, events), probe=OneGpu()) as run, client(run) as http:
        for route in MODEL_ROUTES:
            body = {"model": "m-alias", "prompt": "hi", "input": "hi", "tokens": [104, 105]}
            for target, rid in (
                (route, "body"),
                (f"/models/m{route}", "path"),
                (f"/models/m-alias{route}", "alias"),
            ):
                r = await http.post(target, json=body, headers={"X-Request-Id": f"{rid}{route}"})
                # The fake serves five of them; it answers the others with its own 404.
                assert r.status_code in (200, 404), (target, r.status_code)
                assert b"not_found" not in r.content, target  # not vllmd's 404
        tokenized = await http.post("/models/m/tokenize", json={"prompt": "hé"})
        detokenized = await http.post("/models/m-alias/detokenize", json={"tokens": [104, 105]})
    assert tokenized.status_code == 200 and tokenized.json()["tokens"] == list("hé".encode())
    assert detokenized.status_code == 200 and detokenized.json()["prompt"] == "hi"
    seen = _lines(events)
    for route in MODEL_ROUTES:
        for rid in ("body", "path", "alias"):
            assert f"request {route} {rid}{route}" in seen


async def test_path_form_needs_a_model_name_or_an_alias_without_slash(tmp_path: Path) -> None:
    events = tmp_path / "events"
    config = fake_config(
        tmp_path, {"m": {"aliases": ["org/m"], "env": {"FAKE_EVENTS_FILE": str(events)}}}
    )
    async with running(config) as run, client(run) as http:
        body = {"prompt": "x", "max_tokens": 1}
        unknown = await http.post("/models/zzz/v1/completions", json=body)
        slashed = await http.post("/models/org/m/v1/completions", json=body)
        assert run.supervisor.instances["m"].state is InstanceState.STOPPED
        by_name = await http.post("/models/m/v1/completions", json={**body, "model": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert slashed.status_code == 404
    assert by_name.status_code == 200 and by_name.json()["model"] == "m"


async def test_request_metrics_are_labelled_by_route_template_and_other(tmp_path: Path) -> None:
    """Regression: `endpoint` was the raw path, so every junk path made a new series."""
    config = fake_config(tmp_path, {"m": {}})
    async with running(config) as run, client(run) as http:
        ok = await http.post(
            "/models/m/v1/chat/completions", json={"messages": [], "max_tokens": 1}
        )
        assert ok.status_code == 200
        await http.post("/v1/chat/completions", json={"model": "m", "messages": []})
        junk = [f"/models/m/v1/junk{i}" for i in range(30)] + [f"/junk/{i}" for i in range(30)]
        for target in junk:
            assert (await http.post(target, json={"model": "m"})).status_code == 404
            assert (await http.get(target)).status_code == 404
        registry = run.metrics.registry
    samples = [
        s
        for family in registry.collect()
        if family.name == "vllmd_requests"
        for s in family.samples
        if s.name == "vllmd_requests_total"
    ]
    series = {(s.labels["model"], s.labels["endpoint"], s.labels["code"]): s.value for s in samples}
    assert series == {
        ("m", "/v1/chat/completions", "200"): 2.0,
        ("", "other", "404"): float(2 * len(junk)),
    }


async def test_model_failed_is_503_with_retry_after_60(tmp_path: Path) -> None:
    """Regression: `model_failed` carried no Retry-After; docs/design.md wants it on every 503."""
    env = {"FAKE_MODE": "crash_at_start", "FAKE_STARTUP_DELAY": "0"}
    config = fake_config(tmp_path, {"m": {"env": env, "max_restarts": 1}})
    async with running(config) as run, client(run) as http:
        body = {"model": "m", "prompt": "x"}
        assert (await http.post("/v1/completions", json=body)).status_code == 502
        with anyio.fail_after(10):
            await run.supervisor.instances["m"].wait_state(InstanceState.FAILED)
        r = await http.post("/v1/completions", json=body)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_failed"
    assert r.headers["retry-after"] == "60"
