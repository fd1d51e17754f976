"""Restarts, failures and the placer's start slots through the whole daemon (fake engines).

Each test here was written against a defect (issue 6): its docstring names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anyio
import httpx
import pytest

from tests.fakes.fake_gpu import FakeGpu
from tests.integration.harness import client, eventually, fake_config, running
from vllmd.config import Config
from vllmd.daemon import Running
from vllmd.errors import VllmdError
from vllmd.events import Event
from vllmd.instance.instance import Instance
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
S = InstanceState
GiB = 2**30


def _req(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "prompt": "x", "max_tokens": 1, **extra}


async def _post(http: httpx.AsyncClient, body: dict[str, object]) -> None:
    await http.post("/v1/completions", json=body)


def _spawns(run: Running, model: str) -> int:
    return sum(1 for e in run.events.history if e.kind == "spawned" and e.model == model)


def _intervals(history: list[Event]) -> dict[str, list[tuple[float, float]]]:
    """Per model, the (starting, ready-or-left) intervals of its starts, by event id."""
    out: dict[str, list[tuple[float, float]]] = {}
    opened: dict[str, float] = {}
    for e in history:
        if e.kind != "state" or e.model is None:
            continue
        if e.fields["new"] in ("starting", "waking"):
            opened[e.model] = e.id
        elif e.model in opened:
            out.setdefault(e.model, []).append((opened.pop(e.model), e.id))
    return out


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)


async def test_crashed_engine_leaves_ready_before_its_processes_are_cleaned_up(
    tmp_path: Path,
) -> None:
    """Defect: a crashed engine stayed `ready` while it was killed and its output drained, so
    new requests got 502 instead of queuing for the restart."""
    env = {"FAKE_MODE": "crash_after_requests:2", "FAKE_SPAWN_CHILDREN": "1"}
    config = fake_config(tmp_path, {"m": {"env": env}})
    async with running(config) as run, client(run) as http:
        m = run.supervisor.instances["m"]
        seen: list[bool] = []

        def on_event(event: Event) -> None:
            if event.kind == "state" and event.fields["new"] == "backoff":
                seen.append(m.pgid() is not None)  # the engine not yet cleaned up

        run.events.on_event(on_event)
        assert (await http.post("/v1/completions", json=_req("m"))).status_code == 502
        with anyio.fail_after(10):
            await m.wait_state(S.BACKOFF)
        with anyio.fail_after(10):
            await m.wait_state(S.READY)
    assert seen[:1] == [True]


async def test_loading_a_failed_model_starts_a_fresh_restart_window(tmp_path: Path) -> None:
    """Defect: a `failed` model loaded again kept its old restart window, so one more crash
    failed it again at once."""
    env = {"FAKE_MODE": "crash_at_start", "FAKE_STARTUP_DELAY": "0"}
    config = fake_config(tmp_path, {"m": {"env": env, "max_restarts": 1}})
    async with running(config) as run, client(run) as http:
        m = run.supervisor.instances["m"]
        await http.post("/v1/completions", json=_req("m"))
        with anyio.fail_after(10):
            await m.wait_state(S.FAILED)
        assert _spawns(run, "m") == 2  # the start and one restart
        with anyio.fail_after(15), pytest.raises(VllmdError):
            await run.supervisor.load(m)
        with anyio.fail_after(10):
            await m.wait_state(S.FAILED)
        assert _spawns(run, "m") == 4  # again a start and one restart


async def test_unloading_a_failed_model_stops_it(tmp_path: Path) -> None:
    """Defect: unloading a `failed` model did nothing (failed -> stopped is legal)."""
    env = {"FAKE_MODE": "crash_at_start", "FAKE_STARTUP_DELAY": "0"}
    config = fake_config(tmp_path, {"m": {"env": env, "max_restarts": 0}})
    async with running(config) as run, client(run) as http:
        m = run.supervisor.instances["m"]
        await http.post("/v1/completions", json=_req("m"))
        with anyio.fail_after(10):
            await m.wait_state(S.FAILED)
        failed = await http.post("/v1/completions", json=_req("m"))
        assert failed.json()["error"]["code"] == "model_failed"
        with anyio.fail_after(5):
            await run.supervisor.unload(m)
        assert m.state is S.STOPPED
        # No longer failed: a request starts it again (and its start fails again).
        spawns = _spawns(run, "m")
        await http.post("/v1/completions", json=_req("m"))
        assert _spawns(run, "m") == spawns + 1


def _slot_config(tmp_path: Path, b_startup: str, c: Mapping[str, object] | None = None) -> Config:
    """a crashes on its second request; b starts slowly on the same device; c is idle."""
    return fake_config(
        tmp_path,
        {
            "a": {"env": {"FAKE_MODE": "crash_after_requests:3"}},
            "b": {"env": {"FAKE_STARTUP_DELAY": b_startup}},
            "c": dict(c or {}),
        },
        scheduler={"min_residency": "0s"},
    )


async def _past_the_backoff_delay(a: Instance) -> None:
    """a crashed: wait until its restart waits for the start slot, past its 1 s backoff."""
    with anyio.fail_after(5):
        await a.wait_state(S.BACKOFF)
    await anyio.sleep(1.5)


async def _crash_a_while_b_starts(run: Running, http: httpx.AsyncClient) -> None:
    """a and c ready; b starting slowly (it holds cpu0's one memory operation); a crashes and
    its restart waits for the device."""
    assert (await http.post("/v1/completions", json=_req("a"))).status_code == 200
    assert (await http.post("/v1/completions", json=_req("c"))).status_code == 200
    b = run.supervisor.instances["b"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(_post, http, _req("b"))
        await eventually(lambda: b.state is S.STARTING)
        assert (await http.post("/v1/completions", json=_req("a"))).status_code == 502
        tg.cancel_scope.cancel()


async def test_restart_waiting_for_a_start_slot_is_not_lost_when_the_placer_wakes_on_its_timer(
    tmp_path: Path,
) -> None:
    """Defect: a restart waited for a start slot on an event the placer's loop replaced
    without setting when it woke on its timer (here: c's idle_ttl): it waited forever."""
    config = _slot_config(tmp_path, b_startup="4", c={"idle_ttl": "2s"})
    async with running(config) as run, client(run) as http:
        await _crash_a_while_b_starts(run, http)
        a = run.supervisor.instances["a"]
        b = run.supervisor.instances["b"]
        with anyio.fail_after(20):
            await b.wait_state(S.READY)
            await a.wait_state(S.READY)
        assert _spawns(run, "a") == 2


async def test_unloading_a_model_waiting_to_restart_stops_it(tmp_path: Path) -> None:
    """Defect: the start slot never checked whether the model was still wanted: stopping a
    model in backoff (and shutdown with it) hung until the slot came."""
    config = _slot_config(tmp_path, b_startup="8")
    async with running(config) as run, client(run) as http:
        await _crash_a_while_b_starts(run, http)
        a = run.supervisor.instances["a"]
        b = run.supervisor.instances["b"]
        await _past_the_backoff_delay(a)
        assert b.state is S.STARTING and a.state is S.BACKOFF
        with anyio.fail_after(3):
            await run.supervisor.unload(a)
        assert run.supervisor.status(a).state is S.STOPPED
        assert _spawns(run, "a") == 1


async def test_shutdown_while_a_restart_waits_for_its_slot_spawns_nothing(
    tmp_path: Path,
) -> None:
    """Review defect: shutdown told the waiting restart "go" (the placer closing) before the
    model was unwanted, so it spawned a new engine on its way out."""
    config = _slot_config(tmp_path, b_startup="8")
    async with running(config) as run, client(run) as http:
        await _crash_a_while_b_starts(run, http)
        a = run.supervisor.instances["a"]
        await _past_the_backoff_delay(a)
        with anyio.fail_after(15):
            await run.supervisor.stop_all()
        assert _spawns(run, "a") == 1
        assert a.state is S.STOPPED


async def test_wakes_count_toward_max_concurrent_starts(tmp_path: Path) -> None:
    """Defect: a wake (which loads weights and sizes a KV cache like a start) did not count
    toward `max_concurrent_starts`."""
    config = fake_config(
        tmp_path,
        {
            "a": {"devices": ["0"], "memory": "8GiB", "idle_ttl": "300ms"},
            "b": {"devices": ["1"], "memory": "8GiB", "env": {"FAKE_STARTUP_DELAY": "2"}},
        },
        devices={},
        engine={"max_concurrent_starts": 1},
        scheduler={"min_residency": "0s", "sleep_residue": "1GiB", "host_memory": "64GiB"},
    )
    async with (
        running(config, probe=FakeGpu(tmp_path / "gpu", count=2)) as run,
        client(run) as http,
    ):
        a, b = run.supervisor.instances["a"], run.supervisor.instances["b"]
        assert (await http.post("/v1/completions", json=_req("a"))).status_code == 200
        with anyio.fail_after(5):
            await a.wait_state(S.SLEEPING)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_post, http, _req("b"))
            await eventually(lambda: b.state is S.STARTING)
            assert (await http.post("/v1/completions", json=_req("a"))).status_code == 200
        history = list(run.events.history)
    spans = _intervals(history)
    assert not _overlap(spans["a"][1:], spans["b"]), "a woke while b was starting"


async def test_max_concurrent_starts_limits_starts_on_different_devices(tmp_path: Path) -> None:
    """One start at a time host-wide by default; two when allowed (so the check can fail)."""
    for allowed, overlapping in ((1, False), (2, True)):
        path = tmp_path / str(allowed)
        path.mkdir()
        slow = {"env": {"FAKE_STARTUP_DELAY": "1.5"}}
        config = fake_config(
            path,
            {"a": {**slow, "devices": ["cpu0"]}, "b": {**slow, "devices": ["cpu1"]}},
            devices={"cpu1": {"kind": "cpu", "memory": "64GiB"}},
            engine={"max_concurrent_starts": allowed},
        )
        async with running(config) as run, client(run) as http:
            async with anyio.create_task_group() as tg:
                for name in ("a", "b"):
                    tg.start_soon(_post, http, _req(name))
            spans = _intervals(list(run.events.history))
        assert _overlap(spans["a"], spans["b"]) is overlapping, allowed


async def test_one_memory_operation_per_device(tmp_path: Path) -> None:
    """Starts on one device never overlap (vLLM's profiling would see a neighbour's memory
    change), even with start slots to spare; a start on another device may."""
    slow = {"env": {"FAKE_STARTUP_DELAY": "1.5"}}
    config = fake_config(
        tmp_path,
        {"a": slow, "b": slow, "c": {**slow, "devices": ["cpu1"]}},
        devices={"cpu1": {"kind": "cpu", "memory": "64GiB"}},
        engine={"max_concurrent_starts": 3},
    )
    async with running(config) as run, client(run) as http:
        async with anyio.create_task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(_post, http, _req(name))
        spans = _intervals(list(run.events.history))
    assert not _overlap(spans["a"], spans["b"])
    assert _overlap(spans["c"], spans["a"] + spans["b"])


async def test_freed_memory_is_held_for_the_head_of_the_queue(tmp_path: Path) -> None:
    """A big model waiting for memory is not starved by a small one that would fit now."""
    config = fake_config(
        tmp_path,
        {
            "busy": {"memory": "3GiB", "env": {"FAKE_TOKEN_DELAY": "0.5"}},
            "big": {"memory": "5GiB"},
            "small": {"memory": "3GiB"},
        },
        devices={"cpu0": {"kind": "cpu", "memory": "7GiB"}},
        scheduler={"headroom": "512MiB", "min_residency": "0s"},
    )
    async with running(config) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=_req("busy"))).status_code == 200
        async with anyio.create_task_group() as tg:
            # busy is serving for ~2 s: big (5 GiB) must wait for it to be evicted
            tg.start_soon(_post, http, _req("busy", max_tokens=4))
            await eventually(lambda: run.supervisor.instances["busy"].in_flight == 1)
            tg.start_soon(_post, http, _req("big"))
            await eventually(lambda: run.supervisor.admission.depth("big") == 1)
            # small (3 GiB) fits beside busy right now, but big came first
            tg.start_soon(_post, http, _req("small"))
        history = list(run.events.history)
    spawned = [e.model for e in history if e.kind == "spawned"]
    assert spawned.index("big") < spawned.index("small")


async def test_max_queue_total_bounds_requests_waiting_across_models(tmp_path: Path) -> None:
    slow = {"env": {"FAKE_STARTUP_DELAY": "2"}}
    config = fake_config(
        tmp_path, {"a": slow, "b": slow, "c": slow}, gateway={"max_queue_total": 2}
    )
    async with running(config) as run, client(run) as http:
        codes: dict[str, httpx.Response] = {}

        async def ask(name: str) -> None:
            codes[name] = await http.post("/v1/completions", json=_req(name))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "a")
            tg.start_soon(ask, "b")
            await eventually(lambda: run.supervisor.admission.total == 2)
            tg.start_soon(ask, "c")
    assert codes["a"].status_code == codes["b"].status_code == 200
    assert codes["c"].status_code == 503
    assert codes["c"].json()["error"]["code"] == "queue_full"
    assert int(codes["c"].headers["retry-after"]) >= 1


async def test_restarts_and_reloads_are_counted_from_events(tmp_path: Path) -> None:
    """Defect: vllmd_model_restarts_total was never incremented and restarts after a crash
    were missing from vllmd_model_loads_total."""
    config = fake_config(tmp_path, {"m": {"env": {"FAKE_MODE": "crash_after_requests:3"}}})
    async with running(config) as run, client(run) as http:
        for _ in range(2):
            await http.post("/v1/completions", json=_req("m"))
        m = run.supervisor.instances["m"]
        with anyio.fail_after(10):
            await m.wait_state(S.BACKOFF)
            await m.wait_state(S.READY)
        registry = run.metrics.registry
        loads = registry.get_sample_value("vllmd_model_loads_total", {"model": "m", "result": "ok"})
        restarts = registry.get_sample_value(
            "vllmd_model_restarts_total", {"model": "m", "reason": "crash"}
        )
        durations = registry.get_sample_value(
            "vllmd_model_load_duration_seconds_count", {"model": "m"}
        )
    assert loads == 2
    assert restarts == 1
    assert durations == 2
