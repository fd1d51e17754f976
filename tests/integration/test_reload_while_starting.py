"""A reload that changes a model while its lazy load is under way (fake engines): the engine
starting with the old config is stopped and the requests waiting for it are carried to the
start with the new one, none failed 502 `start_failed` (issue 21, item 3)."""

from __future__ import annotations

import json
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
from vllmd.instance.states import InstanceState as S

pytestmark = pytest.mark.anyio


def _write(path: Path, argv_file: Path, args: str, delay: str = "2") -> None:
    env = f'env = {{ FAKE_STARTUP_DELAY = "{delay}", FAKE_ARGV_FILE = "{argv_file}" }}'
    model = fake_model("m", f"args = {args}\n{env}")
    write_fake_config(
        path, model, gateway='queue_timeout = "30s"', engine='health_interval = "200ms"'
    )


async def test_a_reload_during_a_lazy_load_carries_its_waiters_to_the_new_start(
    tmp_path: Path,
) -> None:
    """20 requests wait for a slow start; a reload changes the model's args meanwhile: every
    one is answered 200 by an engine started with the new args, on the same instance."""
    path, argv_file = tmp_path / "vllmd.toml", tmp_path / "argv.jsonl"
    _write(path, argv_file, '["--round=old"]')
    answers: list[httpx.Response] = []
    async with running(load_config(path)) as run:
        m = run.supervisor.get("m")
        ctl = control(run, timeout=60)

        async def call(http: httpx.AsyncClient) -> None:
            body = {"model": "m", "prompt": "x", "max_tokens": 2}
            answers.append(await http.post("/v1/completions", json=body))

        async with ctl, client(run) as http, anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(call, http)
            await eventually(lambda: argv_file.exists() and m.state is S.STARTING, timeout=10)
            assert run.supervisor.admission.depth("m") == 20  # the premise: all wait for it
            _write(path, argv_file, '["--round=new"]')
            reloaded = await ctl.post("/v1/reload")
        same = run.supervisor.get("m") is m
    assert reloaded.status_code == 200 and reloaded.json()["restarted"] == ["m"], reloaded.text
    assert Counter(r.status_code for r in answers) == {200: 20}, [r.text for r in answers][:3]
    starts = [json.loads(line) for line in argv_file.read_text().splitlines()]
    assert len(starts) == 2 and "--round=old" in starts[0] and "--round=new" in starts[1]
    assert same and m.starts == 2


async def test_a_start_asked_but_not_begun_is_not_spawned_with_the_replaced_config(
    tmp_path: Path,
) -> None:
    """The placer asked for a start (placed for the old config) and the actor had not begun it
    when a reload changed the model: nothing is spawned with the old config; the instance
    takes the new one, and the next request is served by an engine started with it."""
    path, argv_file = tmp_path / "vllmd.toml", tmp_path / "argv.jsonl"
    _write(path, argv_file, '["--round=old"]', delay="0.2")
    async with running(load_config(path)) as run, client(run) as http:
        m = run.supervisor.get("m")
        _write(path, argv_file, '["--round=new"]', delay="0.2")
        new = load_config(path).models["m"]
        m.want_up()  # as the placer's launch does; the actor has not looked yet
        with anyio.fail_after(10):
            kept = await run.supervisor.add(new)
        state, spawned = m.state, argv_file.exists()
        answer = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert kept is m and m.model == new and state is S.STOPPED and not spawned
    assert answer.status_code == 200, answer.text
    starts = [json.loads(line) for line in argv_file.read_text().splitlines()]
    assert len(starts) == 1 and "--round=new" in starts[0]
