"""The memory budget through the whole daemon, with fake engines: eviction, sleep, queues."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anyio
import httpx
import pytest
import structlog

from tests.integration.harness import client, eventually, fake_config, running
from vllmd.config import Config
from vllmd.devices import DeviceSnapshot, GpuProcess
from vllmd.engine.process import group_alive
from vllmd.events import Event
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
GiB = 2**30
BODY = {"prompt": "x", "max_tokens": 1}


def _req(model: str) -> dict[str, object]:
    return {"model": model, **BODY}


def _events(history: list[Event], kind: str) -> list[Event]:
    return [e for e in history if e.kind == kind]


def _two_fit(tmp_path: Path, models: Mapping[str, Mapping[str, object]] | None = None) -> Config:
    """A cpu device whose budget (6.5 GiB usable) fits two 3 GiB models, not three."""
    return fake_config(
        tmp_path,
        models or {"a": {}, "b": {}, "c": {}},
        devices={"cpu0": {"kind": "cpu", "memory": "7GiB"}},
        scheduler={"headroom": "512MiB", "min_residency": "0s"},
    )


async def test_least_recently_used_model_is_stopped_before_the_third_starts(tmp_path: Path) -> None:
    config = _two_fit(tmp_path)
    async with running(config) as run, client(run) as http:
        assert (await http.post("/v1/completions", json=_req("a"))).status_code == 200
        assert (await http.post("/v1/completions", json=_req("b"))).status_code == 200
        a = run.supervisor.instances["a"]
        a_group = a.pgid()
        assert a_group is not None
        assert (await http.post("/v1/completions", json=_req("c"))).status_code == 200
        states = {n: i.state for n, i in run.supervisor.instances.items()}
        history = list(run.events.history)
    assert states == {
        "a": InstanceState.STOPPED,
        "b": InstanceState.READY,
        "c": InstanceState.READY,
    }
    assert not group_alive(a_group)
    evicted = _events(history, "evicted")
    assert [
        (e.model, e.fields["for_model"], e.fields["reason"], e.fields["action"]) for e in evicted
    ] == [("a", "c", "lru", "stop")]
    assert evicted[0].fields["freed_bytes"] == {"cpu0": 3 * GiB}
    # a was gone before c was spawned
    order = [(str(e.kind), e.model) for e in history if e.kind in ("evicted", "spawned")]
    assert order.index(("evicted", "a")) < order.index(("spawned", "c"))


async def test_pinned_model_survives_memory_pressure(tmp_path: Path) -> None:
    config = _two_fit(tmp_path, {"a": {"pinned": True}, "b": {}, "c": {}})
    async with running(config) as run, client(run) as http:
        for name in ("a", "b", "c"):
            assert (await http.post("/v1/completions", json=_req(name))).status_code == 200
        states = {n: i.state for n, i in run.supervisor.instances.items()}
    assert states["a"] is InstanceState.READY
    assert states["b"] is InstanceState.STOPPED


async def test_lower_priority_model_is_evicted_first_even_if_used_later(tmp_path: Path) -> None:
    config = _two_fit(tmp_path, {"a": {"priority": 5}, "b": {}, "c": {"priority": 5}})
    async with running(config) as run, client(run) as http:
        for name in ("a", "b", "c"):
            assert (await http.post("/v1/completions", json=_req(name))).status_code == 200
        states = {n: i.state for n, i in run.supervisor.instances.items()}
    assert states == {
        "a": InstanceState.READY,
        "b": InstanceState.STOPPED,
        "c": InstanceState.READY,
    }


async def test_model_that_cannot_fit_is_503_insufficient_memory(tmp_path: Path) -> None:
    config = _two_fit(tmp_path, {"a": {"pinned": True}, "b": {"pinned": True}, "c": {}})
    async with running(config) as run, client(run) as http:
        await http.post("/v1/completions", json=_req("a"))
        await http.post("/v1/completions", json=_req("b"))
        r = await http.post("/v1/completions", json=_req("c"))
        assert run.supervisor.instances["c"].state is InstanceState.STOPPED
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "insufficient_memory"
    assert "does not fit" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1


async def test_busy_victim_is_waited_for_not_interrupted(tmp_path: Path) -> None:
    """A model with a request in flight is never evicted; the load waits until it is idle."""
    slow = {"env": {"FAKE_TOKEN_DELAY": "0.3"}}
    config = _two_fit(tmp_path, {"a": slow, "b": slow, "c": {}})
    async with running(config) as run, client(run) as http:
        await http.post("/v1/completions", json=_req("a"))
        await http.post("/v1/completions", json=_req("b"))
        results: dict[str, int] = {}

        async def call(name: str, tokens: int) -> None:
            r = await http.post(
                "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": tokens}
            )
            results[name] = r.status_code

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a", 5)  # 1.5 s in flight on a (the LRU model)
            tg.start_soon(call, "b", 5)
            await eventually(lambda: run.supervisor.instances["a"].in_flight == 1)
            tg.start_soon(call, "c", 1)
    assert results == {"a": 200, "b": 200, "c": 200}


async def test_queued_requests_for_one_model_are_served_after_one_load(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    config = _two_fit(tmp_path, {"a": {}, "b": {}, "c": {"env": {"FAKE_STARTS_FILE": str(starts)}}})
    async with running(config) as run, client(run) as http:
        await http.post("/v1/completions", json=_req("a"))
        await http.post("/v1/completions", json=_req("b"))
        codes: list[int] = []

        async def one() -> None:
            codes.append((await http.post("/v1/completions", json=_req("c"))).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        evicted = _events(list(run.events.history), "evicted")
    assert codes == [200] * 8
    assert len(starts.read_text().splitlines()) == 1
    assert len(evicted) == 1


async def test_idle_ttl_stops_an_idle_model(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"a": {"idle_ttl": "500ms"}, "b": {}})
    async with running(config) as run, client(run) as http:
        await http.post("/v1/completions", json=_req("a"))
        await http.post("/v1/completions", json=_req("b"))
        a = run.supervisor.instances["a"]
        with anyio.fail_after(5):
            await a.wait_state(InstanceState.STOPPED)
        # "evicted" is told once the stop is over, just after the state changes
        await eventually(lambda: _events(list(run.events.history), "evicted"))
        assert run.supervisor.instances["b"].state is InstanceState.READY
        evicted = _events(list(run.events.history), "evicted")
    assert [(e.model, e.fields["reason"]) for e in evicted] == [("a", "idle")]


async def test_cpu_models_are_stopped_not_slept_and_the_log_says_so_once(tmp_path: Path) -> None:
    config = _two_fit(tmp_path)
    with structlog.testing.capture_logs() as logs:
        async with running(config) as run, client(run) as http:
            for name in ("a", "b", "c", "a", "b", "c"):
                assert (await http.post("/v1/completions", json=_req(name))).status_code == 200
            evicted = _events(list(run.events.history), "evicted")
    assert {e.fields["action"] for e in evicted} == {"stop"}
    said = [entry for entry in logs if entry["event"] == "no_sleep_mode"]
    assert len(said) == len({e.model for e in evicted})  # once per model, not per eviction
    assert len(evicted) > len(said)


class FakeGpuProbe:
    """One 20 GiB GPU. `lingering` pids stay in its compute-process list (as a slow driver
    would keep them) for `linger` more snapshots after they are added."""

    def __init__(self, linger: int = 0, up: bool = True) -> None:
        self.up = up
        self.calls = 0
        self.linger = linger
        self.lingering: set[int] = set()

    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        self.calls += 1
        if self.lingering and self.linger <= 0:
            self.lingering.clear()
        self.linger -= 1 if self.lingering else 0
        processes = tuple(GpuProcess(pid, 1 * GiB) for pid in sorted(self.lingering))
        gpu = DeviceSnapshot(
            name="0",
            kind="gpu",
            uuid="GPU-fake-0",
            index=0,
            total=20 * GiB,
            used=0,
            free=20 * GiB,
            utilization=0.0,
            temperature=40.0,
            power=100.0,
            processes=processes,
            up=self.up,
            error=None if self.up else "probe timed out",
        )
        return {"0": gpu}


def _gpu_config(tmp_path: Path, env: Mapping[str, str], **model: object) -> Config:
    """A 20 GiB GPU (1 GiB headroom) that fits two 8 GiB models, not three."""
    models = {n: {"devices": ["0"], "memory": "8GiB", "env": env, **model} for n in ("a", "b", "c")}
    return fake_config(
        tmp_path,
        models,
        devices={},
        # The fake models' weights are unknown (hub-like ids), so each level-1 sleeper is
        # bounded by its reservation in host RAM: leave room for two of them.
        scheduler={
            "headroom": "1GiB",
            "min_residency": "0s",
            "sleep_residue": "1GiB",
            "host_memory": "64GiB",
        },
    )


async def test_victims_on_gpus_are_put_to_sleep_and_woken_on_demand(tmp_path: Path) -> None:
    events = tmp_path / "events"
    config = _gpu_config(tmp_path, {"FAKE_EVENTS_FILE": str(events)})
    async with running(config, probe=FakeGpuProbe()) as run, client(run) as http:
        for name in ("a", "b", "c"):
            assert (await http.post("/v1/completions", json=_req(name))).status_code == 200
        a = run.supervisor.instances["a"]
        assert a.state is InstanceState.SLEEPING and a.sleep_level == 1
        a_pid = a.pgid()
        # a is asleep, not gone: waking it (b sleeps for it) keeps the same engine process.
        assert (await http.post("/v1/completions", json=_req("a"))).status_code == 200
        assert run.supervisor.status(a).state is InstanceState.READY
        assert a_pid is not None and a.pgid() == a_pid
        assert run.supervisor.instances["b"].state is InstanceState.SLEEPING
        history = list(run.events.history)
    lines = events.read_text().splitlines()
    assert lines.count("sleep 1") == 2 and "wake all" in lines
    evicted = _events(history, "evicted")
    assert [(e.model, e.fields["action"]) for e in evicted] == [("a", "sleep"), ("b", "sleep")]
    assert any(
        e.kind == "state" and e.model == "a" and e.fields.get("new") == "waking" for e in history
    )


async def test_level_2_sleep_wakes_with_the_weight_reload_sequence(tmp_path: Path) -> None:
    events = tmp_path / "events"
    config = _gpu_config(tmp_path, {"FAKE_EVENTS_FILE": str(events)}, sleep_level=2)
    async with running(config, probe=FakeGpuProbe()) as run, client(run) as http:
        for name in ("a", "b", "c", "a"):
            assert (await http.post("/v1/completions", json=_req(name))).status_code == 200
        assert run.supervisor.instances["b"].sleep_level == 2
    lines = [line for line in events.read_text().splitlines() if not line.startswith("request")]
    assert "sleep 2" in lines
    # Every step, in order: weights back, reloaded, then the KV cache, then a fresh prefix
    # cache (the discarded one refers to freed blocks).
    wake = lines[lines.index("wake weights") :]
    assert wake[:4] == ["wake weights", "rpc reload_weights", "wake kv_cache", "reset_prefix_cache"]


async def _load_while_victim_pids_linger(
    tmp_path: Path, probe: FakeGpuProbe
) -> tuple[httpx.Response, int, list[Event], InstanceState]:
    """a and b run; a's pid is made to linger on the GPU; then c needs a's memory."""
    config = _gpu_config(tmp_path, {}, sleep_level=0)
    async with running(config, probe=probe) as run, client(run) as http:
        await http.post("/v1/completions", json=_req("a"))
        await http.post("/v1/completions", json=_req("b"))
        a = run.supervisor.instances["a"]
        a_pid = a.pgid()
        assert a_pid is not None
        probe.lingering = {a_pid}
        calls_before = probe.calls
        r = await http.post("/v1/completions", json=_req("c"))
        return (
            r,
            probe.calls - calls_before,
            list(run.events.history),
            (run.supervisor.instances["c"].state),
        )


async def test_start_waits_until_the_victims_pids_leave_the_gpu(tmp_path: Path) -> None:
    probe = FakeGpuProbe(linger=3)
    r, probes, _, _ = await _load_while_victim_pids_linger(tmp_path, probe)
    assert r.status_code == 200
    assert not probe.lingering  # c started only once the pid had gone
    assert probes >= 3


async def test_pids_that_never_leave_the_gpu_fail_the_load_clearly(tmp_path: Path) -> None:
    r, _, history, c_state = await _load_while_victim_pids_linger(
        tmp_path, FakeGpuProbe(linger=10**6)
    )
    assert c_state is InstanceState.STOPPED
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "insufficient_memory"
    assert "still on the device" in r.json()["error"]["message"]
    assert _events(history, "release_unverified")


async def test_idle_gpu_model_sleeps_then_stops_after_sleep_ttl(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        {"a": {"devices": ["0"], "memory": "8GiB", "idle_ttl": "300ms"}},
        devices={},
        scheduler={"sleep_ttl": "500ms", "sleep_residue": "1GiB"},
    )
    async with running(config, probe=FakeGpuProbe()) as run, client(run) as http:
        await http.post("/v1/completions", json=_req("a"))
        a = run.supervisor.instances["a"]
        with anyio.fail_after(5):
            await a.wait_state(InstanceState.SLEEPING)
        await eventually(lambda: len(_events(list(run.events.history), "evicted")) == 2)
        assert a.state is InstanceState.STOPPED
        evicted = _events(list(run.events.history), "evicted")
    assert [(e.fields["reason"], e.fields["action"]) for e in evicted] == [
        ("idle", "sleep"),
        ("sleep_ttl", "stop"),
    ]


async def test_preload_models_start_with_the_daemon(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"a": {"preload": True}, "b": {}})
    async with running(config) as run:
        a = run.supervisor.instances["a"]
        with anyio.fail_after(10):
            await a.wait_state(InstanceState.READY)
        assert run.supervisor.instances["b"].state is InstanceState.STOPPED


async def test_queued_request_whose_client_leaves_is_dropped_and_the_load_goes_on(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {"env": {"FAKE_STARTUP_DELAY": "1.5"}}})
    async with running(config) as run, client(run, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=_req("a"))
        a = run.supervisor.instances["a"]
        await eventually(lambda: run.supervisor.admission.depth("a") == 0)
        assert run.supervisor.admission.total == 0
        with anyio.fail_after(10):
            await a.wait_state(InstanceState.READY)


async def test_a_down_device_makes_the_daemon_unready_and_its_models_wait(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        {"a": {"devices": ["0"], "memory": "8GiB"}},
        devices={},
        gateway={"queue_timeout": "300ms"},
    )
    async with running(config, probe=FakeGpuProbe(up=False)) as run, client(run) as http:
        ready = await http.get("/ready")
        r = await http.post("/v1/completions", json=_req("a"))
        assert run.supervisor.instances["a"].state is InstanceState.STOPPED
    assert ready.status_code == 503 and ready.json()["devices_up"] == []
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
