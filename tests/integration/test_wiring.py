"""The composition root: a daemon built from a config, and a model added to it while it runs
(what a reload will use), through one call."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.integration.harness import client, fake_config, running
from vllmd.errors import ModelNotFound
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
S = InstanceState


def _req(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "x", "max_tokens": 1}


async def test_a_model_added_to_a_running_daemon_is_served_under_its_names(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {}})
    later = fake_config(tmp_path, {"a": {}, "b": {"aliases": ["bee"]}})
    async with running(config) as run, client(run) as http:
        with pytest.raises(ModelNotFound):
            run.supervisor.get("bee")
        before = await http.post("/v1/completions", json=_req("bee"))
        await run.supervisor.add(later.models["b"])
        after = await http.post("/v1/completions", json=_req("bee"))
        listed = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        added = [e for e in run.events.history if e.kind == "model_added"]
    assert before.status_code == 404
    assert after.status_code == 200, after.text
    assert listed == ["a", "b"]
    assert [(e.model, e.fields["replaced"]) for e in added] == [("b", False)]


async def test_a_changed_model_restarts_the_running_one_in_place_and_an_unchanged_one_keeps_running(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {}})
    bigger = fake_config(tmp_path, {"a": {"memory": "4GiB"}})
    async with running(config) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=_req("a"))).status_code == 200
        old = run.supervisor.get("a")
        old_pid = run.supervisor.status(old).pid
        same = await run.supervisor.add(config.models["a"])
        unchanged_pid = run.supervisor.status(same).pid
        with anyio.fail_after(10):
            new = await run.supervisor.add(bigger.models["a"])
        stopped_before_replacement = old.state
        answered = await http.post("/v1/completions", json=_req("a"))
        status = run.supervisor.status(new)
    assert same is old and unchanged_pid == old_pid
    assert new is old and stopped_before_replacement is S.STOPPED
    assert answered.status_code == 200
    assert status.state is S.READY and status.pid != old_pid
    assert status.held_bytes == 4 * 2**30
