"""memory = "auto" for a model whose files are not there yet: the config loads, a request for
it gets a 503 naming models.X.memory and the fix, and the daemon serves the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import client, fake_config, running

pytestmark = pytest.mark.anyio


async def test_a_model_not_downloaded_is_refused_naming_memory(tmp_path: Path) -> None:
    cache = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    config = fake_config(
        tmp_path,
        {"later": {"memory": "auto", "env": cache}, "now": {}},
    )
    assert config.models["later"].memory == 0
    async with running(config, {}) as run:
        async with client(run) as http:
            refused = await http.post("/v1/completions", json={"model": "later", "prompt": "x"})
            served = await http.post("/v1/completions", json={"model": "now", "prompt": "x"})
        spawned = [e for e in run.events.history if e.kind.value == "spawned"]
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert 'models.later.memory: "auto" cannot size fake/later' in message
    assert "not in the engine's HF cache yet" in message and "set memory" in message
    assert served.status_code == 200, served.text
    assert [e.model for e in spawned] == ["now"]  # nothing was started for "later"


async def test_a_preloaded_model_not_downloaded_stays_stopped(tmp_path: Path) -> None:
    """preload (or a loaded-on-purpose mark) does not start what cannot be sized: no failed
    model, no model_failed alert; requests get the 503."""
    cache = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    config = fake_config(tmp_path, {"later": {"memory": "auto", "env": cache, "preload": True}})
    async with running(config, {}) as run:
        async with client(run) as http:
            refused = await http.post("/v1/completions", json={"model": "later", "prompt": "x"})
        kinds = [e.kind.value for e in run.events.history]
        state = run.supervisor.instances["later"].state
    assert refused.status_code == 503
    assert state.value == "stopped"
    assert "start_failed" not in kinds and "model_failed" not in kinds
