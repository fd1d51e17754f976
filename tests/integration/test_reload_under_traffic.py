"""Reload and unload while requests wait (fake engines): a reload that restarts a running model
moves its waiting requests to the new start; an unload during a lazy load answers its waiters
503 `model_unloaded`; a reload that shrinks a device refuses what pinned models cannot give up
and otherwise evicts until every device fits (issue 21, items 3, 4 and 5)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest

from tests.integration.harness import (
    client,
    control,
    eventually,
    fake_model,
    running,
    write_fake_config,
)
from vllmd.config import load_config
from vllmd.daemon import Running
from vllmd.events import Kind
from vllmd.instance.states import InstanceState as S

pytestmark = pytest.mark.anyio


def _write(path: Path, models: str, *, cpu_memory: str = "64GiB") -> Path:
    return write_fake_config(
        path,
        models,
        gateway='queue_timeout = "20s"',
        engine='drain_timeout = "1s"\nhealth_interval = "200ms"',
        sections='[scheduler]\nmin_residency = "0s"',
        cpu_memory=cpu_memory,
    )


def _model(name: str, extra: str = "") -> str:
    return fake_model(name, extra)


def _control(run: Running) -> httpx.AsyncClient:
    return control(run, timeout=60)


def _req(model: str, max_tokens: int = 2) -> dict[str, object]:
    return {"model": model, "prompt": "x", "max_tokens": max_tokens}


def _evictions(run: Running, kind: Kind) -> list[tuple[str | None, str, str]]:
    return [
        (e.model, e.fields["action"], e.fields["reason"])
        for e in run.events.history
        if e.kind is kind
    ]


async def test_a_reload_that_restarts_a_running_model_fails_none_of_its_requests(
    tmp_path: Path,
) -> None:
    """4 clients send requests in a loop while 4 reloads change the model's args: every one
    is answered 200 (the waiting ones by the next engine), none 502 `start_failed`."""
    path = _write(tmp_path / "vllmd.toml", _model("m"))
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    async with running(load_config(path)) as run, _control(run) as ctl:
        m = run.supervisor.get("m")
        stop = anyio.Event()

        async def loop() -> None:
            async with client(run) as http:
                while not stop.is_set():
                    r = await http.post("/v1/completions", json=_req("m"))
                    statuses[r.status_code] += 1
                    if r.status_code != 200:
                        failures.append(r.text)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(loop)
            with anyio.fail_after(60):
                await eventually(lambda: statuses[200] >= 8, timeout=20)
                for n in range(4):
                    before = m.starts
                    _write(path, _model("m", f'args = ["--reload-round={n}"]'))
                    answer = await ctl.post("/v1/reload")
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["restarted"] == ["m"]
                    served = statuses[200]

                    def moved_on(before: int = before, served: int = served) -> bool:
                        return m.starts > before and statuses[200] > served + 8

                    await eventually(moved_on, 20)
            stop.set()
        same = run.supervisor.get("m") is m
    assert failures == [] and set(statuses) == {200}, (statuses, failures[:3])
    assert same  # the model's waiters kept their instance: its engine was started again


async def test_unload_during_a_lazy_load_answers_every_waiter_503_model_unloaded(
    tmp_path: Path,
) -> None:
    """50 callers wait for a slow start; an unload answers each 503 `model_unloaded` with
    Retry-After (none 500 `invalid_state`), or 200 where a later start carried it."""
    path = _write(tmp_path / "vllmd.toml", _model("m", 'env = { FAKE_STARTUP_DELAY = "3" }'))
    answers: list[httpx.Response] = []
    async with running(load_config(path)) as run, _control(run) as ctl:
        m = run.supervisor.get("m")

        async def call(http: httpx.AsyncClient) -> None:
            answers.append(await http.post("/v1/completions", json=_req("m")))

        async with client(run) as http, anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call, http)
            # The premise: a lazy load under way, every caller waiting for it.
            await eventually(
                lambda: run.supervisor.admission.depth("m") == 50 and m.state is S.STARTING, 10
            )
            unloaded = await ctl.post("/v1/models/m/unload")
    assert unloaded.status_code == 200, unloaded.text
    assert len(answers) == 50
    codes = Counter(
        (r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "") for r in answers
    )
    assert set(codes) <= {(503, "model_unloaded"), (200, "")}, codes
    assert codes[(503, "model_unloaded")] >= 1, codes
    assert all(r.headers.get("retry-after") for r in answers if r.status_code == 503)


async def test_a_reload_that_shrinks_a_device_under_pinned_models_is_refused(
    tmp_path: Path,
) -> None:
    """cpu0 cut to 5 GiB (4 GiB after the headroom) under 6 GiB of pinned models: 422
    naming the device and the pinned models, and nothing changes."""
    models = _model("a", "pinned = true") + _model("b", "pinned = true") + _model("c")
    path = _write(tmp_path / "vllmd.toml", models)
    async with running(load_config(path)) as run, client(run) as http, _control(run) as ctl:
        for name in ("a", "b"):
            assert (await http.post("/v1/completions", json=_req(name))).status_code == 200
        pids = {n: run.supervisor.status(run.supervisor.get(n)).pid for n in ("a", "b")}
        _write(path, models, cpu_memory="5GiB")
        answer = await ctl.post("/v1/reload")
        after = {n: run.supervisor.status(run.supervisor.get(n)).pid for n in ("a", "b")}
        (cpu0,) = run.supervisor.accounts()
        failed = [e for e in run.events.history if e.kind is Kind.RELOAD_FAILED]
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "config_invalid"
    (problem,) = answer.json()["error"]["problems"]
    assert "devices.cpu0" in problem and "a, b" in problem, problem
    assert after == pids
    assert cpu0.total == 64 * 2**30 and cpu0.free > 0
    assert len(failed) == 1


async def test_a_reload_that_shrinks_a_device_evicts_idle_models_then_busy_ones(
    tmp_path: Path,
) -> None:
    """cpu0 cut to 4 GiB (3 GiB after the headroom) under three running models: the idle one
    goes first, then one of the busy ones is drained and stopped, each with reason `reload`;
    the device fits again."""
    slow = 'env = { FAKE_TOKEN_DELAY = "0.5" }'
    models = _model("a") + _model("b", slow) + _model("c", slow)
    path = _write(tmp_path / "vllmd.toml", models)
    async with running(load_config(path)) as run, client(run) as http, _control(run) as ctl:
        for name in ("a", "b", "c"):
            assert (await http.post("/v1/completions", json=_req(name))).status_code == 200

        async def long_request(name: str) -> None:
            await http.post("/v1/completions", json=_req(name, 40))

        async with anyio.create_task_group() as tg:
            for name in ("b", "c"):
                tg.start_soon(long_request, name)
            await eventually(lambda: all(run.supervisor.get(n).in_flight for n in ("b", "c")))
            _write(path, models, cpu_memory="4GiB")
            answer = await ctl.post("/v1/reload")
            (cpu0,) = run.supervisor.accounts()
            states = {n: run.supervisor.get(n).state for n in ("a", "b", "c")}
            tg.cancel_scope.cancel()
        evicting = _evictions(run, Kind.EVICTING)
        reloaded = [e.fields for e in run.events.history if e.kind is Kind.RELOADED]
    assert answer.status_code == 200, answer.text
    assert evicting[0] == ("a", "stop", "reload"), evicting
    assert len(evicting) == 2 and evicting[1][1:] == ("stop", "reload"), evicting
    assert evicting[1][0] in ("b", "c")
    assert cpu0.total == 4 * 2**30 and cpu0.free >= 0, cpu0
    assert sorted(s.value for s in states.values()) == ["ready", "stopped", "stopped"], states
    assert reloaded[-1]["keys"] == ["devices.cpu0.memory"]
