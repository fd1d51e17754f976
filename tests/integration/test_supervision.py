"""Supervision paths through the whole daemon, with the fake engine (fast)."""

from __future__ import annotations

import json
import socket
from functools import partial
from pathlib import Path

import anyio
import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import chat, client, eventually, fake_config, running
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_first_request_starts_the_model_lazily(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    config = fake_config(tmp_path, {"m": {"env": {"FAKE_STARTS_FILE": str(starts)}}})
    async with running(config) as run, client(run) as http:
        assert run.supervisor.instances["m"].state is InstanceState.STOPPED
        response = await http.post("/v1/chat/completions", json=chat("m"))
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"]
        assert run.supervisor.status(run.supervisor.get("m")).state is InstanceState.READY
    assert len(_lines(starts)) == 1


async def test_concurrent_requests_share_one_start(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    config = fake_config(
        tmp_path, {"m": {"env": {"FAKE_STARTS_FILE": str(starts), "FAKE_STARTUP_DELAY": "1"}}}
    )
    async with running(config) as run, client(run) as http:
        codes: list[int] = []

        async def one() -> None:
            codes.append(
                (await http.post("/v1/completions", json={"model": "m", "prompt": "x"})).status_code
            )

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
    assert codes == [200] * 8
    assert len(_lines(starts)) == 1


async def test_streaming_passes_chunks_through(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {"env": {"FAKE_TOKEN_DELAY": "0.05"}}})
    async with (
        running(config) as run,
        client(run) as http,
        http.stream("POST", "/v1/chat/completions", json=chat("m", stream=True, max_tokens=6)) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 7  # one chunk per token, then [DONE]


async def test_alias_and_path_routing_reach_the_model(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {"aliases": ["org/m-alias"]}})
    async with running(config) as run, client(run) as http:
        by_alias = await http.post("/v1/chat/completions", json=chat("org/m-alias"))
        assert by_alias.status_code == 200
        by_path = await http.post("/models/m/v1/chat/completions", json=chat("whatever"))
        assert by_path.status_code == 200
        assert by_path.json()["model"] == "m"


async def test_request_id_is_passed_through_and_generated(tmp_path: Path) -> None:
    events = tmp_path / "events"
    config = fake_config(tmp_path, {"m": {"env": {"FAKE_EVENTS_FILE": str(events)}}})
    async with running(config) as run, client(run) as http:
        r = await http.post(
            "/v1/completions",
            json={"model": "m", "prompt": "x"},
            headers={"X-Request-Id": "abc-123"},
        )
        assert r.headers["x-request-id"] == "abc-123"
        r2 = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert len(r2.headers["x-request-id"]) >= 16
    assert any(line.endswith("abc-123") for line in _lines(events))


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b'{"prompt": "no model"}', 400, "invalid_request"),
        (b'{"model": "nope", "prompt": "x"}', 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors(
    tmp_path: Path, body: bytes, status: int, code: str
) -> None:
    config = fake_config(tmp_path, {"m": {}})
    async with running(config) as run, client(run) as http:
        r = await http.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert run.supervisor.instances["m"].state is InstanceState.STOPPED


async def test_body_over_max_body_is_413(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {}}, gateway={"max_body": "1KiB"})
    async with running(config) as run, client(run) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "x" * 2000})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


async def test_api_keys_are_required_when_configured(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {}}, gateway={"api_keys": ["sekret"]})
    async with running(config) as run, client(run) as http:
        denied = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        allowed = await http.post(
            "/v1/completions",
            json={"model": "m", "prompt": "x"},
            headers={"Authorization": "Bearer sekret"},
        )
        health = await http.get("/health")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200
    assert health.status_code == 200


async def test_crash_at_start_is_502_with_status_not_engine_output(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {"env": {"FAKE_MODE": "crash_at_start"}}})
    async with running(config) as run, client(run) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        instance = run.supervisor.instances["m"]
        assert any("cannot load model" in line for line in instance.output)
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "start_failed"
    assert "status 3" in message and "vllmctl logs m" in message
    assert "cannot load model" not in message


async def test_engine_that_never_becomes_ready_times_out(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path, {"m": {"env": {"FAKE_MODE": "hang"}}}, engine={"startup_timeout": "1s"}
    )
    async with running(config) as run, client(run) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert run.supervisor.instances["m"].pgid() is None  # killed, not left hanging
    assert r.status_code == 502
    assert "not ready within 1s" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("mode", "says"),
    [("infer_dead", "answered 500"), ("infer_wedged", "did not answer within 2s")],
)
async def test_an_engine_that_fails_its_warm_up_is_a_failed_start(
    tmp_path: Path, mode: str, says: str
) -> None:
    """/health answers 200 but the engine cannot infer: never READY, a counted failed start
    that the waiting request is told of, and nothing of the engine left."""
    config = fake_config(
        tmp_path,
        {"m": {"env": {"FAKE_MODE": mode, "FAKE_STARTUP_DELAY": "0"}}},
        engine={"startup_timeout": "2s"},
    )
    async with running(config) as run, client(run) as http:
        with anyio.fail_after(15):
            r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        instance = run.supervisor.instances["m"]
        history = list(run.events.history)
        assert instance.pgid() is None
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "start_failed"
    assert "failed its warm-up" in r.json()["error"]["message"]
    failed = [e for e in history if e.kind.value == "start_failed"]
    assert len(failed) == 1 and says in str(failed[0].fields["error"])
    assert not [e for e in history if e.fields.get("new") == "ready"]


async def test_crashed_engine_is_restarted_and_serves_again(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    env = {"FAKE_MODE": "crash_after_requests:3", "FAKE_STARTS_FILE": str(starts)}
    config = fake_config(tmp_path, {"m": {"env": env}})
    async with running(config) as run, client(run) as http:
        body = {"model": "m", "prompt": "x"}
        assert (await http.post("/v1/completions", json=body)).status_code == 200  # warm-up + 1
        in_flight = await http.post("/v1/completions", json=body)  # the engine dies on this one
        assert in_flight.status_code == 502
        assert in_flight.json()["error"]["code"] == "engine_unavailable"
        instance = run.supervisor.instances["m"]
        with anyio.fail_after(10):
            await instance.wait_state(InstanceState.BACKOFF)
        assert instance.last_error is not None and "status 1" in instance.last_error
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200
        assert len(instance.restarts) == 1
    assert len(_lines(starts)) == 2


async def test_model_fails_after_max_restarts_and_answers_503_at_once(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        {
            "m": {
                "env": {"FAKE_MODE": "crash_at_start", "FAKE_STARTUP_DELAY": "0"},
                "max_restarts": 1,
            }
        },
    )
    async with running(config) as run, client(run) as http:
        body = {"model": "m", "prompt": "x"}
        first = await http.post("/v1/completions", json=body)
        assert first.status_code == 502
        instance = run.supervisor.instances["m"]
        with anyio.fail_after(10):
            await instance.wait_state(InstanceState.FAILED)
        with anyio.fail_after(1):
            r = await http.post("/v1/completions", json=body)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_failed"
    assert r.headers["retry-after"] == "60"  # an operator must act


async def test_unhealthy_engine_is_restarted(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    # Healthy long enough for readiness to be seen even on a loaded machine, then sick.
    env = {"FAKE_MODE": "unhealthy_after:2", "FAKE_STARTS_FILE": str(starts)}
    config = fake_config(tmp_path, {"m": {"env": env}})
    async with running(config) as run, client(run) as http:
        assert (
            await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        ).status_code == 200
        instance = run.supervisor.instances["m"]
        with anyio.fail_after(10):
            await instance.wait_state(InstanceState.BACKOFF)
        assert "health checks" in (instance.last_error or "")
        with anyio.fail_after(10):
            await instance.wait_state(InstanceState.READY)
    assert len(_lines(starts)) == 2


async def test_shutdown_kills_engines_that_ignore_sigterm_and_escaped_children(
    tmp_path: Path,
) -> None:
    pids_file = tmp_path / "pids"
    env = {
        "FAKE_MODE": "ignore_sigterm",
        "FAKE_SPAWN_CHILDREN": "1",
        "FAKE_PIDS_FILE": str(pids_file),
    }
    config = fake_config(tmp_path, {"m": {"env": env}}, engine={"stop_timeout": "1s"})
    async with running(config) as run, client(run) as http:
        assert (
            await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        ).status_code == 200
        instance = run.supervisor.instances["m"]
        leader = instance.pgid()  # the engine's leader is its group's
        assert leader is not None
        await eventually(pids_file.exists)
    pids = [int(line.split()[0]) for line in _lines(pids_file)]
    assert len(pids) == 2  # one in the group, one that left it with setsid
    for pid in [leader, *pids]:
        assert not _alive(pid), f"pid {pid} survived the daemon's shutdown"


async def test_client_disconnect_cancels_the_upstream_stream(tmp_path: Path) -> None:
    events = tmp_path / "events"
    env = {"FAKE_EVENTS_FILE": str(events), "FAKE_TOKEN_DELAY": "0.2", "FAKE_TOKENS": "100"}
    config = fake_config(tmp_path, {"m": {"env": env}})
    async with running(config) as run, client(run) as http:
        body = chat("m", stream=True, max_tokens=100)
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "gone"}
        ) as r:
            async for _ in r.aiter_lines():
                break
        await eventually(lambda: "cancelled gone" in _lines(events))
        await eventually(lambda: run.supervisor.instances["m"].in_flight == 0)


async def test_clients_gone_as_their_requests_arrive_are_counted_and_never_wait(
    tmp_path: Path,
) -> None:
    """Regression: the disconnect callback, called at once for a client gone already, used
    to cancel the request's task where no await of the request took it. Each of these
    clients sends a whole request and closes: it is never forwarded, or forwarded and
    cancelled; every one counts as 499 and the daemon serves the next client."""
    events = tmp_path / "events"
    env = {"FAKE_EVENTS_FILE": str(events), "FAKE_TOKEN_DELAY": "1"}
    config = fake_config(tmp_path, {"m": {"env": env}})
    async with running(config) as run, client(run) as http:
        assert (await http.post("/v1/completions", json={"model": "m", "prompt": "x"})).is_success
        host, port = run.gateway_url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps(chat("m", max_tokens=100)).encode()
        for i in range(20):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                    b"content-type: application/json\r\nx-request-id: gone%d\r\n"
                    b"content-length: %d\r\n\r\n%s" % (i, len(body), body)
                )
                sock.shutdown(socket.SHUT_WR)
        labels = {"model": "m", "endpoint": "/v1/chat/completions", "code": "499"}
        sample = run.metrics.registry.get_sample_value
        await eventually(lambda: sample("vllmd_requests_total", labels) == 20)
        await eventually(lambda: run.supervisor.instances["m"].in_flight == 0)

        def cancelled() -> set[str]:
            return {x.split()[-1] for x in _lines(events) if x.startswith("cancelled")}

        forwarded = {
            x.split()[-1] for x in _lines(events) if x.startswith("request") and "gone" in x
        }
        await eventually(lambda: forwarded <= cancelled())  # the engine saw each client leave
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 200


async def test_full_queue_is_503_queue_full(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path, {"m": {"env": {"FAKE_STARTUP_DELAY": "2"}}}, gateway={"max_queue": 1}
    )
    async with running(config) as run, client(run) as http:
        body = {"model": "m", "prompt": "x"}
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(http.post, "/v1/completions", json=body))
            await eventually(lambda: run.supervisor.admission.depth("m") >= 1)
            r = await http.post("/v1/completions", json=body)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1


async def test_queue_timeout_is_503_with_retry_after(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path, {"m": {"env": {"FAKE_STARTUP_DELAY": "3"}}}, gateway={"queue_timeout": "500ms"}
    )
    async with running(config) as run, client(run) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_timeout"
        assert int(r.headers["retry-after"]) >= 1
        # The load goes on for the next request.
        with anyio.fail_after(10):
            await run.supervisor.instances["m"].wait_state(InstanceState.READY)


async def test_models_endpoint_lists_every_model_with_state(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"a": {"aliases": ["alpha"]}, "b": {"max_model_len": 128}})
    async with running(config) as run, client(run) as http:
        await http.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
        listing = (await http.get("/v1/models")).json()
        one = await http.get("/v1/models/b")
        missing = await http.get("/v1/models/zzz")
        ready = await http.get("/ready")
    by_id = {m["id"]: m for m in listing["data"]}
    assert set(by_id) == {"a", "b"}
    assert by_id["a"]["vllmd"]["state"] == "ready" and by_id["a"]["vllmd"]["aliases"] == ["alpha"]
    assert by_id["b"]["vllmd"]["state"] == "stopped"
    assert one.json()["max_model_len"] == 128
    assert missing.status_code == 404
    assert ready.status_code == 200


async def test_metrics_count_requests_by_model_and_code(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {}})
    async with running(config) as run, client(run) as http:
        await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = (await http.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    route = "/v1/completions"
    assert value("vllmd_requests_total", model="m", endpoint=route, code="200") == 1.0
    assert value("vllmd_requests_total", model="", endpoint=route, code="404") == 1.0
    assert value("vllmd_model_state", model="m", state="ready") == 1.0


async def test_engine_environment_is_cleaned_of_systemd_variables(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {}})
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1", "KEEP_ME": "1"}
    async with running(config, env=env) as run, client(run) as http:
        await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        instance = run.supervisor.instances["m"]
        pgid = instance.pgid()
        assert pgid is not None
        leader = psutil.Process(pgid)
        children = [leader, *leader.children(recursive=True)]
        environ = next(p.environ() for p in children if "fake_engine" in " ".join(p.cmdline()))
        oom = [Path(f"/proc/{p.pid}/oom_score_adj").read_text().strip() for p in children]
    assert "NOTIFY_SOCKET" not in environ and "WATCHDOG_USEC" not in environ
    assert environ["KEEP_ME"] == "1"
    assert oom and set(oom) == {"500"}


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def test_start_that_lost_a_memory_race_is_retried_not_counted(tmp_path: Path) -> None:
    """vLLM's profiling asserts when memory changed while it profiled ("Error in memory
    profiling", vllm/v1/worker/gpu_worker.py): a neighbour's doing, not a crash of this
    model, so it is retried uncounted and never pushes the model to `failed`."""
    message = (
        "AssertionError: Error in memory profiling. Initial free memory 40.1 GiB, current "
        "free memory 41.2 GiB. This happens when other processes sharing the same container "
        "release GPU memory while vLLM is profiling during initialization."
    )
    env = {"FAKE_MODE": "crash_at_start", "FAKE_STARTUP_DELAY": "0", "FAKE_CRASH_MESSAGE": message}
    config = fake_config(tmp_path, {"m": {"env": env, "max_restarts": 1}})
    async with running(config) as run, client(run) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        instance = run.supervisor.instances["m"]
        await eventually(lambda: instance.restart_policy.profiling_retries >= 2, 10)
        assert instance.state is not InstanceState.FAILED
        assert len(instance.restarts) == 0
    assert r.status_code == 502


async def test_a_start_vllm_refuses_for_memory_is_planned_again_then_answered_503(
    tmp_path: Path,
) -> None:
    """vLLM refuses to start when free memory is below its fraction (request_memory): a
    lasting shortage, not a failure of the model. The placer plans once more with fresh
    readings; refused again, the waiting request gets 503 insufficient_memory with
    Retry-After, and the model is stopped, never failed, its restarts uncounted."""
    message = (
        "ValueError: Free memory on device cuda:0 (10.1/79.2 GiB) on startup is less than "
        "desired GPU memory utilization (0.5, 39.6 GiB). Decrease GPU memory utilization or "
        "reduce GPU memory used by other processes."
    )
    env = {"FAKE_MODE": "crash_at_start", "FAKE_STARTUP_DELAY": "0", "FAKE_CRASH_MESSAGE": message}
    config = fake_config(tmp_path, {"m": {"env": env, "max_restarts": 0}})
    answers: list[httpx.Response] = []

    async def ask(http: httpx.AsyncClient) -> None:
        answers.append(await http.post("/v1/completions", json={"model": "m", "prompt": "x"}))

    async with running(config) as run, client(run) as http:
        async with anyio.create_task_group() as tg:  # four waiters share one load
            for _ in range(4):
                tg.start_soon(ask, http)
        instance = run.supervisor.instances["m"]
        state, restarts = instance.state, len(instance.restarts)
        first = [str(e.kind) for e in run.events.history if e.model == "m"]
        await ask(http)  # a later load starts over: planned twice again
        history = list(run.events.history)
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "insufficient_memory"
        assert int(r.headers["retry-after"]) >= 1
        assert "on startup is less than desired" in r.json()["error"]["message"]
    assert state is InstanceState.STOPPED and restarts == 0
    assert first.count("start_refused") == 2 and first.count("spawned") == 2
    assert first.count("rejected") == 1
    assert "start_failed" not in first and "model_failed" not in first
    kinds = [str(e.kind) for e in history if e.model == "m"]
    assert kinds.count("spawned") == 4 and kinds.count("rejected") == 2
