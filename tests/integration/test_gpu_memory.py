"""GPU memory through the whole daemon, on a fake GPU that follows the fake engines (see
tests/fakes/fake_gpu.py): measured footprints, sleep residue, leaky and failed sleeps, the
release of a stopped engine's memory, foreign memory, and a starting engine's workers."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import anyio
import httpx
import psutil
import pytest

from tests.fakes.fake_gpu import FOREIGN_PID_BASE, FakeGpu
from tests.integration.harness import FAKE_ENGINE, client, eventually, fake_config, running
from vllmd.cli.doctor import attribution_check
from vllmd.config import Config
from vllmd.devices import CompositeProbe, DeclaredProbe, DeviceSnapshot
from vllmd.events import Event
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
GiB = 2**30
MiB = 2**20
S = InstanceState
# An H100 80GB: NVML's v1 total, the driver's reserved part, and vLLM's context per engine.
H100 = {"total": 81559 * MiB, "reserved": 600 * MiB, "context": 512 * MiB}


def _h100(tmp_path: Path, count: int = 1) -> FakeGpu:
    return FakeGpu(
        tmp_path / "gpu",
        count=count,
        total=H100["total"],
        reserved=H100["reserved"],
        context=H100["context"],
    )


def _req(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "x", "max_tokens": 1}


def _events(history: list[Event], kind: str, model: str | None = None) -> list[Event]:
    return [e for e in history if e.kind == kind and (model is None or e.model == model)]


def _config(
    tmp_path: Path, models: Mapping[str, Mapping[str, object]], **sections: Mapping[str, object]
) -> Config:
    """8 GiB models on the fake GPU "0" (20 GiB, 1 GiB headroom: two fit, not three)."""
    specs = {name: {"devices": ["0"], "memory": "8GiB", **spec} for name, spec in models.items()}
    scheduler = {"headroom": "1GiB", "min_residency": "0s", "sleep_residue": "1GiB"}
    return fake_config(
        tmp_path,
        specs,
        devices={},
        scheduler={**scheduler, **sections.pop("scheduler", {})},
        **sections,
    )


def _worker_pids(gpu: FakeGpu, model: str) -> set[int]:
    return {h.pid for h in gpu.workers(model)}


async def _post_all(http: httpx.AsyncClient, *models: str) -> None:
    for name in models:
        r = await http.post("/v1/completions", json=_req(name))
        assert r.status_code == 200, (name, r.text)


# --- the fake itself, against what FACTS.md says of the real part --------------------------------


def _spawn_engine(
    gpu: FakeGpu, tmp_path: Path, output: int = subprocess.DEVNULL, **env: str
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(FAKE_ENGINE), "--model", "fake/m", "--served-model-name", "m"]
    argv += ["--gpu-memory-utilization", "0.4", "--uds", str(tmp_path / "engine.sock")]
    environ = {**os.environ, **gpu.env(), "CUDA_VISIBLE_DEVICES": gpu.uuid("0"), **env}
    return subprocess.Popen(
        argv, env=environ, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )


async def test_fake_engines_worker_child_holds_the_memory_until_the_driver_lets_go(
    tmp_path: Path,
) -> None:
    """The memory is the worker's (a child in the engine's process group, as in vLLM): its
    CUDA context at once, then, after the allocation delay, ceil(F x CUDA's total) more
    (vllm/v1/worker/utils.py request_memory); after the group is killed the pid stays listed
    for the release lag, then the memory is free."""
    gpu = FakeGpu(tmp_path / "gpu", release_lag=0.5)
    engine = _spawn_engine(gpu, tmp_path, FAKE_STARTUP_DELAY="60", FAKE_GPU_ALLOC_DELAY="1.0")
    total = gpu.cuda_total()
    assert total == 20 * GiB - 152 * MiB  # NVML's total less the driver's reserved part
    try:
        with anyio.fail_after(10):
            snap = await _next_snapshot_where(gpu, lambda s: bool(s["0"].processes))
        (worker,) = snap["0"].processes
        assert worker.pid != engine.pid
        assert psutil.Process(worker.pid).ppid() == engine.pid
        assert os.getpgid(worker.pid) == engine.pid
        assert worker.used_bytes == H100["context"]  # the context, before vLLM measures
        with anyio.fail_after(10):
            snap = await _next_snapshot_where(
                gpu, lambda s: s["0"].processes[0].used_bytes != H100["context"]
            )
        held = H100["context"] + math.ceil(0.4 * total)
        assert snap["0"].processes[0].used_bytes == held
        assert (snap["0"].used, snap["0"].free, snap["0"].total) == (held, total - held, total)
    finally:
        os.killpg(engine.pid, signal.SIGKILL)
        engine.wait()
    await eventually(lambda: _gone(worker.pid))
    snap = await gpu.snapshot()
    assert [p.pid for p in snap["0"].processes] == [worker.pid]  # the driver has not let go
    with anyio.fail_after(10):
        snap = await _next_snapshot_where(gpu, lambda s: not s["0"].processes)
    assert snap["0"].free == total


async def test_fake_engine_refuses_to_start_without_free_memory_like_vllm(tmp_path: Path) -> None:
    gpu = FakeGpu(tmp_path / "gpu")
    gpu.add_foreign(13 * GiB)
    engine = _spawn_engine(gpu, tmp_path, subprocess.PIPE)
    out, _ = engine.communicate(timeout=30)
    assert engine.returncode == 1
    assert b"on startup is less than desired GPU memory utilization" in out
    assert gpu.workers("m") == []


def _gone(pid: int) -> bool:
    """The process has exited. Its parent is gone: it was re-parented to init, or to this
    process when an earlier test made it a subreaper (then it is ours to reap)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


async def _next_snapshot_where(
    gpu: FakeGpu, condition: Callable[[Mapping[str, DeviceSnapshot]], bool]
) -> Mapping[str, DeviceSnapshot]:
    """Take snapshots (nobody else does here) until `condition` holds."""
    while True:
        snap = await gpu.snapshot()
        if condition(snap):
            return snap
        await anyio.sleep(0.05)


# --- measured footprint ---------------------------------------------------------------------------


async def test_footprint_over_reservation_is_held_and_exported(tmp_path: Path) -> None:
    """a reserves 8 GiB but its worker takes 10: the accounting holds 10, so b (10 GiB) needs
    a out of the way. Held at its reservation, a would leave 11 GiB and b would just start."""
    gpu = FakeGpu(tmp_path / "gpu")
    config = _config(
        tmp_path, {"a": {"env": {"FAKE_GPU_BYTES": str(10 * GiB)}}, "b": {"memory": "10GiB"}}
    )
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
        registry = run.metrics.registry
        labels = {"model": "a", "device": "0"}
        used = registry.get_sample_value("vllmd_model_memory_used_bytes", labels)
        reserved = registry.get_sample_value("vllmd_model_reserved_bytes", labels)
        await _post_all(http, "b")
        history = list(run.events.history)
        states = {n: i.state for n, i in run.supervisor.instances.items()}
    (measured,) = _events(history, "measured", "a")
    assert measured.fields["used_bytes"] == 10 * GiB
    assert measured.fields["over_reservation_bytes"] == 2 * GiB
    assert used == 10 * GiB and reserved == 10 * GiB
    evicted = _events(history, "evicted")
    assert [(e.model, e.fields["for_model"]) for e in evicted] == [("a", "b")]
    assert states == {"a": S.SLEEPING, "b": S.READY}


async def test_a_declared_budget_on_a_gpu_sizes_the_engine_against_the_whole_gpu(
    tmp_path: Path,
) -> None:
    """Defect: with `[devices."0"] memory` (a budget below the GPU's size), the engine was
    told `--gpu-memory-utilization` = reservation / budget, a fraction of the WHOLE GPU to vLLM:
    a 6 GiB model on a 20 GiB GPU budgeted at 10 GiB took 12 GiB."""
    gpu = FakeGpu(tmp_path / "gpu")
    config = fake_config(
        tmp_path,
        {"a": {"devices": ["0"], "memory": "6GiB"}},
        devices={"0": {"kind": "gpu", "memory": "10GiB"}},
        scheduler={"headroom": "1GiB"},
    )
    probe = CompositeProbe(gpu, DeclaredProbe(config.devices))  # as the daemon builds it
    async with running(config, gpu.env(), probe=probe) as run, client(run) as http:
        await _post_all(http, "a")
        history = list(run.events.history)
    (measured,) = _events(history, "measured", "a")
    assert measured.fields["used_bytes"] <= 6 * GiB
    assert measured.fields["used_bytes"] > 5 * GiB


# --- sleep --------------------------------------------------------------------------------------


async def test_measured_sleep_residue_is_what_a_sleeper_holds(tmp_path: Path) -> None:
    """The residue is measured on the GPU once asleep: 2 GiB here, more than the assumed
    1 GiB but not leaky (at most half the reservation), so a stays asleep holding 2 GiB."""
    gpu = FakeGpu(tmp_path / "gpu")
    config = _config(
        tmp_path, {"a": {"env": {"FAKE_GPU_RESIDUE_L1": str(2 * GiB)}}, "b": {}, "c": {}}
    )
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")
        a = run.supervisor.instances["a"]
        held = run.supervisor.status(a).held_bytes
        state = a.state
        reserved = run.metrics.registry.get_sample_value(
            "vllmd_model_reserved_bytes", {"model": "a", "device": "0"}
        )
    assert state is S.SLEEPING
    assert held == reserved == 2 * GiB


async def test_leaky_sleep_escalates_to_stop(tmp_path: Path) -> None:
    """a keeps 6 GiB asleep (assumed: 1 GiB): it is stopped, and c, which would not fit beside
    that residue, starts."""
    gpu = FakeGpu(tmp_path / "gpu")
    config = _config(
        tmp_path, {"a": {"env": {"FAKE_GPU_RESIDUE_L1": str(6 * GiB)}}, "b": {}, "c": {}}
    )
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")
        history = list(run.events.history)
        states = {n: i.state for n, i in run.supervisor.instances.items()}
        a_left = _worker_pids(gpu, "a")
    (leak,) = _events(history, "leaky_sleep")
    assert leak.model == "a"
    assert leak.fields["residue_bytes"] == 6 * GiB and leak.fields["assumed_bytes"] == 1 * GiB
    assert states == {"a": S.STOPPED, "b": S.READY, "c": S.READY}
    assert [(e.model, e.fields["action"]) for e in _events(history, "evicted")] == [("a", "stop")]
    assert not a_left
    assert not _events(history, "start_failed") and not _events(history, "start_profiling_retry")


@pytest.mark.parametrize("failure", ["refuse", "unconfirmed"])
async def test_failed_sleep_stops_the_victim_instead(tmp_path: Path, failure: str) -> None:
    gpu = FakeGpu(tmp_path / "gpu")
    config = _config(tmp_path, {"a": {"env": {"FAKE_SLEEP": failure}}, "b": {}, "c": {}})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")
        history = list(run.events.history)
        states = {n: i.state for n, i in run.supervisor.instances.items()}
    assert [e.model for e in _events(history, "sleep_failed")] == ["a"]
    assert states == {"a": S.STOPPED, "b": S.READY, "c": S.READY}
    assert [(e.model, e.fields["action"]) for e in _events(history, "evicted")] == [("a", "stop")]
    assert not _events(history, "start_failed") and not _events(history, "start_profiling_retry")


@pytest.mark.parametrize("failure", ["wake_fails", "dead_after_wake"])
async def test_failed_wake_restarts_the_engine_and_the_request_is_answered(
    tmp_path: Path, failure: str
) -> None:
    """The wake refused, or done but followed by a warm-up the engine fails."""
    gpu = FakeGpu(tmp_path / "gpu")
    starts = tmp_path / "starts"
    env = {"FAKE_SLEEP": failure, "FAKE_STARTS_FILE": str(starts)}
    config = _config(tmp_path, {"a": {"env": env}, "b": {}, "c": {}})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")
        a = run.supervisor.instances["a"]
        before = a.state
        assert before is S.SLEEPING and a.pgid() is not None
        asleep_pid, asleep_workers = a.pgid(), _worker_pids(gpu, "a")
        assert asleep_workers
        r = await http.post("/v1/completions", json=_req("a"))
        history = list(run.events.history)
        state, pid = a.state, a.pgid()
        workers = _worker_pids(gpu, "a")
    assert r.status_code == 200, r.text
    assert [e.model for e in _events(history, "wake_failed")] == ["a"]
    assert state is S.READY and pid is not None and pid != asleep_pid
    assert len(starts.read_text().splitlines()) == 2
    assert workers and not workers & asleep_workers  # the old worker's memory is gone


# --- release after a stop -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release_lag", "free_lag"),
    [(1.5, 0.0), (0.0, 1.5)],
    ids=["pid-lingers", "memory-lingers"],
)
async def test_start_waits_until_the_victims_memory_is_released(
    tmp_path: Path, release_lag: float, free_lag: float
) -> None:
    """c needs a's memory: c is spawned only once a's worker has left the GPU's process list
    and measured free memory covers c."""
    gpu = FakeGpu(tmp_path / "gpu", release_lag=release_lag, free_lag=free_lag)
    config = _config(tmp_path, {n: {"sleep_level": 0} for n in ("a", "b", "c")})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b")
        a_workers = _worker_pids(gpu, "a")
        await _post_all(http, "c")
        history = list(run.events.history)
    assert a_workers
    (evicted,) = _events(history, "evicted")
    assert (evicted.model, evicted.fields["action"]) == ("a", "stop")
    (spawned,) = _events(history, "spawned", "c")
    assert spawned.time - evicted.time >= 1.0  # the lag (1.5 s), waited out
    seen_before = [snap for t, snap in gpu.readings if t <= spawned.time]
    last = seen_before[-1]["0"]
    assert not {p.pid for p in last.processes} & a_workers
    assert last.free is not None and last.free >= 8 * GiB
    # The fake engine would have refused a blind start ("less than desired"): none happened.
    assert not _events(history, "start_failed") and not _events(history, "start_profiling_retry")


@pytest.mark.parametrize(
    ("release_lag", "free_lag", "problem"),
    [(1e6, 0.0, "still on the device"), (0.0, 1e6, "below the need")],
    ids=["pid-stays", "memory-stays"],
)
async def test_release_that_never_comes_fails_the_load_clearly(
    tmp_path: Path, release_lag: float, free_lag: float, problem: str
) -> None:
    gpu = FakeGpu(tmp_path / "gpu", release_lag=release_lag, free_lag=free_lag)
    config = _config(tmp_path, {n: {"sleep_level": 0} for n in ("a", "b", "c")})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b")
        r = await http.post("/v1/completions", json=_req("c"))
        history = list(run.events.history)
        states = {n: i.state for n, i in run.supervisor.instances.items()}
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "insufficient_memory"
    assert problem in r.json()["error"]["message"]
    assert [e.model for e in _events(history, "release_unverified")] == ["c"]
    assert states == {"a": S.STOPPED, "b": S.READY, "c": S.STOPPED}
    assert not _events(history, "spawned", "c")  # never started blindly


# --- foreign memory -----------------------------------------------------------------------------


@pytest.mark.parametrize(("foreign", "evicted"), [(0, []), (4 * GiB, ["a"])])
async def test_foreign_memory_reduces_the_budget(
    tmp_path: Path, foreign: int, evicted: list[str]
) -> None:
    """19 GiB usable fit a and b (8 GiB each); 4 GiB used by someone else leave room for one."""
    gpu = FakeGpu(tmp_path / "gpu")
    if foreign:
        gpu.add_foreign(foreign)
    config = _config(tmp_path, {"a": {}, "b": {}})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b")
        history = list(run.events.history)
    assert [e.model for e in _events(history, "evicted")] == evicted
    assert not _events(history, "start_failed") and not _events(history, "start_profiling_retry")


async def test_starting_engines_workers_are_not_counted_as_foreign(tmp_path: Path) -> None:
    """Regression: while a starts, its worker already holds a's memory but is not yet among
    a's known descendants. Counted as foreign, a's 8 GiB would count twice (reservation +
    foreign) and b, which fits beside a, would be refused (a is pinned: no victim)."""
    gpu = FakeGpu(tmp_path / "gpu")
    slow = {"FAKE_STARTUP_DELAY": "8", "FAKE_GPU_ALLOC_DELAY": "0.2"}
    config = _config(
        tmp_path,
        {"a": {"pinned": True, "env": slow}, "b": {}},
        engine={"startup_timeout": "60s"},
        gateway={"queue_timeout": "60s"},
    )
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        a = run.supervisor.instances["a"]
        answers: dict[str, httpx.Response] = {}

        async def call(name: str) -> None:
            answers[name] = await http.post("/v1/completions", json=_req(name))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a")
            # vllmd's periodic device refresh sees a's worker holding memory while a starts.
            with anyio.fail_after(30):
                await gpu.wait_for(lambda s: any(p.used_bytes for p in s["0"].processes))
            assert a.state is S.STARTING  # the premise: b is asked for during a's start
            tg.start_soon(call, "b")
        history = list(run.events.history)
    assert answers["a"].status_code == 200
    assert answers["b"].status_code == 200, answers["b"].text
    assert not _events(history, "rejected")


async def test_crash_restart_waits_until_the_crashed_engines_memory_is_released(
    tmp_path: Path,
) -> None:
    """A restart is a start: the crashed engine's worker must have left the GPU first (here
    3 s after the crash, beyond the 1 s backoff), or vLLM refuses to start for lack of free
    memory and the refusal is retried as if a neighbour had raced it."""
    gpu = FakeGpu(tmp_path / "gpu", release_lag=3.0)
    # Request 1 is the warm-up, 2 the first request, 3 crashes the engine.
    config = _config(tmp_path, {"a": {"env": {"FAKE_MODE": "crash_after_requests:3"}}, "b": {}})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b")
        crashed_workers = _worker_pids(gpu, "a")
        crash = await http.post("/v1/completions", json=_req("a"))
        # Asked before vllmd has seen the exit, a request would meet the dead engine's socket.
        await eventually(lambda: _events(list(run.events.history), "crashed", "a"))
        again = await http.post("/v1/completions", json=_req("a"))
        history = list(run.events.history)
    assert crash.status_code == 502
    assert again.status_code == 200, again.text
    assert [e.model for e in _events(history, "crashed")] == ["a"]
    respawned = _events(history, "spawned", "a")[1]
    last = [snap for t, snap in gpu.readings if t <= respawned.time][-1]["0"]
    assert not {p.pid for p in last.processes} & crashed_workers
    assert not _events(history, "start_failed") and not _events(history, "start_profiling_retry")


async def test_restarts_waiting_for_released_memory_hold_their_start_slot(
    tmp_path: Path,
) -> None:
    """Review defect: a restart waiting for its GPU memory to come back held no start slot,
    so two crashed engines on two GPUs restarted side by side past max_concurrent_starts=1."""
    gpu = FakeGpu(tmp_path / "gpu", count=2, release_lag=1.5)
    crash = {"env": {"FAKE_MODE": "crash_after_requests:3"}}
    config = _config(
        tmp_path,
        {"a": {**crash, "devices": ["0"]}, "b": {**crash, "devices": ["1"]}},
        engine={"max_concurrent_starts": 1},
    )
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b")
        async with anyio.create_task_group() as tg:
            for name in ("a", "b"):
                tg.start_soon(partial(http.post, "/v1/completions", json=_req(name)))
        with anyio.fail_after(30):
            for name in ("a", "b"):
                await run.supervisor.instances[name].wait_state(S.BACKOFF)
            for name in ("a", "b"):
                await run.supervisor.instances[name].wait_state(S.READY)
        history = list(run.events.history)
    starts: dict[str, list[tuple[int, int]]] = {}
    opened: dict[str, int] = {}
    for e in history:
        if e.kind == "state" and e.model is not None:
            if e.fields["new"] == "starting":
                opened[e.model] = e.id
            elif e.model in opened:
                starts.setdefault(e.model, []).append((opened.pop(e.model), e.id))
    (a0, a1), (b0, b1) = starts["a"][1], starts["b"][1]  # the restarts
    assert a1 < b0 or b1 < a0, "two restarts at once despite max_concurrent_starts = 1"


async def test_shutdown_while_a_restart_waits_for_its_memory_spawns_nothing(
    tmp_path: Path,
) -> None:
    """Review defect: shutting down while a restart waited for its memory to come back waited
    out the whole bound (stop_timeout) before the stop could proceed."""
    gpu = FakeGpu(tmp_path / "gpu", release_lag=60.0)  # the crashed worker's memory lingers
    config = _config(
        tmp_path,
        {"a": {"env": {"FAKE_MODE": "crash_after_requests:3"}}},
        engine={"stop_timeout": "20s"},  # the bound of the wait for released memory
    )
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
        await http.post("/v1/completions", json=_req("a"))
        a = run.supervisor.instances["a"]
        with anyio.fail_after(10):
            await a.wait_state(S.BACKOFF)
        await anyio.sleep(1.5)  # past the backoff delay: waiting for the memory
        assert a.state is S.BACKOFF
        with anyio.fail_after(5):
            await run.supervisor.stop_all()
        history = list(run.events.history)
    assert len(_events(history, "spawned", "a")) == 1
    assert run.supervisor.status(a).state is S.STOPPED


async def test_models_wait_while_their_gpu_is_down_and_load_when_it_is_back(
    tmp_path: Path,
) -> None:
    gpu = FakeGpu(tmp_path / "gpu")
    gpu.set_up("0", False)
    config = _config(tmp_path, {"a": {}})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        answers: list[httpx.Response] = []

        async def call() -> None:
            answers.append(await http.post("/v1/completions", json=_req("a")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await eventually(lambda: run.supervisor.admission.depth("a") == 1)
            unready = await http.get("/ready")
            assert run.supervisor.instances["a"].state is S.STOPPED
            gpu.set_up("0", True)
        ready = await http.get("/ready")
    assert unready.status_code == 503
    assert [r.status_code for r in answers] == [200]
    assert ready.status_code == 200


# --- the arithmetic of vLLM and NVML: an H100 80GB ----------------------------------------------


def _h100_config(tmp_path: Path, count: int = 3) -> Config:
    models = {name: {"memory": "38GiB"} for name in "abc"[:count]}
    return _config(tmp_path, models, scheduler={"evict_to": "sleep"})


async def test_two_38_gib_models_share_an_h100_each_within_its_memory(tmp_path: Path) -> None:
    """Defect: vLLM's fraction was memory / NVML's v1 total, and its CUDA context lies outside
    the fraction: every engine took its reservation plus its context (and the driver's
    reserved part was budgeted as if CUDA could use it). Now `memory` is the whole footprint:
    F = (memory - overhead) / CUDA's total, so both fit beside the headroom, each measured
    within its memory + 64 MiB, and the third evicts the least recently used and starts at
    its first try."""
    gpu = _h100(tmp_path)
    async with running(_h100_config(tmp_path), gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b")
        both = {n: i.state for n, i in run.supervisor.instances.items() if n in "ab"}
        await _post_all(http, "c")
        history = list(run.events.history)
        states = {n: i.state for n, i in run.supervisor.instances.items()}
    assert both == {"a": S.READY, "b": S.READY}
    measured = {e.model: e.fields for e in _events(history, "measured")}
    for name in "abc":
        assert measured[name]["used_bytes"] <= 38 * GiB + 64 * MiB, (name, measured[name])
        assert measured[name]["over_reservation_bytes"] == 0
        # What vLLM allocated before it measured: its context, learned for the next start.
        assert measured[name]["overhead_bytes"] == H100["context"]
    assert [(e.model, e.fields["for_model"]) for e in _events(history, "evicted")] == [("a", "c")]
    assert len(_events(history, "spawned", "c")) == 1 and not _events(history, "start_failed")
    assert states == {"a": S.SLEEPING, "b": S.READY, "c": S.READY}


async def test_the_learned_overhead_sizes_the_next_start(tmp_path: Path) -> None:
    """The first start uses engine.gpu_overhead (1 GiB); it measures 512 MiB of context, so
    the next start's fraction leaves 512 MiB out, and its footprint is its memory."""
    gpu = _h100(tmp_path)
    config = _h100_config(tmp_path, count=1)
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
        await run.supervisor.unload(run.supervisor.instances["a"])
        await _post_all(http, "a")
        history = list(run.events.history)
    first, second = (e.fields for e in _events(history, "measured", "a"))
    assert first["used_bytes"] == pytest.approx(37 * GiB + H100["context"], abs=8 * MiB)
    assert second["used_bytes"] == pytest.approx(38 * GiB, abs=8 * MiB)
    assert second["used_bytes"] <= 38 * GiB + 64 * MiB


async def test_learned_overheads_outlive_the_daemon(tmp_path: Path) -> None:
    """Kept in the state store (the `measured` events): a restarted daemon's first start of
    the model already leaves the measured overhead, not the default, outside the fraction."""
    gpu = _h100(tmp_path)
    config = _h100_config(tmp_path, count=1)
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
        history = list(run.events.history)
    (measured,) = _events(history, "measured", "a")
    assert measured.fields["used_bytes"] == pytest.approx(38 * GiB, abs=8 * MiB)


async def test_a_learned_overhead_is_not_carried_to_another_gpu_type(tmp_path: Path) -> None:
    """The overhead is learned per device type (NVML's name): after the card is replaced by
    another type, the first start goes by engine.gpu_overhead again and learns anew."""
    gpu = _h100(tmp_path)
    config = _h100_config(tmp_path, count=1)
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
        first = list(run.events.history)
    gpu.product = "NVIDIA A100-SXM4-80GB"
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
        second = list(run.events.history)
    (before,) = _events(first, "measured", "a")
    (after,) = _events(second, "measured", "a")
    assert before.fields["device_type"] == "NVIDIA Fake GPU"
    assert after.fields["device_type"] == "NVIDIA A100-SXM4-80GB"
    # 1 GiB assumed, 512 MiB taken: the start is under its memory, as a first start is.
    assert after.fields["used_bytes"] == pytest.approx(37 * GiB + H100["context"], abs=8 * MiB)
    assert after.fields["overhead_bytes"] == pytest.approx(H100["context"], abs=8 * MiB)


async def test_a_level_1_sleeps_host_ram_is_measured_and_outlives_the_daemon(
    tmp_path: Path,
) -> None:
    """vLLM's level-1 sleep copies the loaded weights to host RAM; the fake's workers hold
    96 MiB then. Its first level-1 sleep measures the engine's RSS rise (event
    `sleep_measured`), kept in the state store: with host_memory = 1 GiB a restarted daemon
    still sleeps `a` at level 1, where the estimate (its 8 GiB reservation: fake/a has no
    checkpoint to size) would send it to level 2."""
    gpu = FakeGpu(tmp_path / "gpu")
    env = {**gpu.env(), "FAKE_GPU_WEIGHTS_BYTES": str(96 * MiB)}
    roomy = _config(tmp_path, {n: {} for n in "abc"}, scheduler={"host_memory": "16GiB"})
    async with running(roomy, env, probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")  # a sleeps for c, at level 1
        first = list(run.events.history)
    (measured,) = _events(first, "sleep_measured", "a")
    assert measured.fields["level"] == 1
    assert measured.fields["host_bytes"] == pytest.approx(96 * MiB, abs=12 * MiB)
    tight = _config(tmp_path, {n: {} for n in "abc"}, scheduler={"host_memory": "1GiB"})
    async with running(tight, env, probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")
        second = list(run.events.history)
    (evicting,) = _events(second, "evicting", "a")
    assert evicting.fields["level"] == 1
    assert not _events(second, "sleep_measured")  # known already: not measured again


SWAPS = int(os.environ.get("VLLMD_GPU_SWAPS", "20"))  # `make gpu-swaps`: 100


async def test_random_swaps_on_two_h100s_never_refuse_a_start(tmp_path: Path) -> None:
    """Five models of mixed sizes on two H100-shaped GPUs (one across both, which stops
    rather than sleeps), asked for in a seeded random order: every request is answered, no
    start is refused by the engine, no wake fails, and no footprint is over its memory."""
    import random

    gpu = _h100(tmp_path, count=2)
    models = {
        "a": {"memory": "20GiB", "devices": ["0"]},
        "b": {"memory": "38GiB", "devices": ["0"]},
        "c": {"memory": "30GiB", "devices": ["1"]},
        "d": {"memory": "38GiB", "devices": ["1"]},
        "e": {"memory": "24GiB", "devices": ["0", "1"]},
    }
    config = _config(tmp_path, models)
    rng = random.Random(19)
    order = [rng.choice("abcde") for _ in range(SWAPS)]
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        for name in order:
            r = await http.post("/v1/completions", json=_req(name))
            assert r.status_code == 200, (name, r.text)
        history = list(run.events.history)
    kinds = {e.kind for e in history}
    assert {"start_failed", "wake_failed", "start_profiling_retry"}.isdisjoint(kinds), kinds
    assert not [e for e in history if e.kind == "crashed"]
    measured = _events(history, "measured")
    assert measured and all(e.fields["over_reservation_bytes"] == 0 for e in measured)
    assert {e.model for e in _events(history, "evicted")}  # it did swap


class _Driver:
    """The fake GPU read through a driver that lists no compute process at all (`listed`
    False: NVML's NOT_SUPPORTED, some vGPU and cloud drivers), or, while `hiding`, lists none
    of vllmd's engines (a reading taken as an engine died), only foreign processes."""

    def __init__(self, gpu: FakeGpu, *, listed: bool = True) -> None:
        self.gpu = gpu
        self.listed = listed
        self.hiding = False

    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        return {n: self._read(s) for n, s in (await self.gpu.snapshot()).items()}

    def _read(self, snap: DeviceSnapshot) -> DeviceSnapshot:
        if not self.listed:
            error = "unsupported: processes"
            return replace(snap, processes=(), processes_listed=False, error=error)
        if self.hiding:
            foreign = tuple(p for p in snap.processes if p.pid >= FOREIGN_PID_BASE)
            return replace(snap, processes=foreign)
        return snap


WHY = {"namespace": "pid_namespace", "wddm": "no_figures", "unlisted": "no_process_list"}


@pytest.mark.parametrize("pids", ["namespace", "wddm", "unlisted"])
async def test_gpus_whose_pids_nvml_cannot_attribute_are_budgeted_by_reservation(
    tmp_path: Path, pids: str
) -> None:
    """In a container without the host's pid namespace NVML lists pids vllmd cannot see
    (nvidia-docker#1483); under WDDM it gives no figures; some vGPU/cloud drivers list no
    compute process at all (NOT_SUPPORTED). Then footprints are unknown, never 0: vllmd says
    so once per GPU (event and warning with the fix), holds reservations, and never counts
    its own engines as foreign, so two models still fit beside each other. Defect: a driver
    that lists none was taken for a pid namespace (and doctor FAILed with --pid=host)."""
    unlisted = pids == "unlisted"
    gpu = FakeGpu(tmp_path / "gpu", pids="visible" if unlisted else pids)  # type: ignore[arg-type]
    probe = _Driver(gpu, listed=False) if unlisted else gpu
    config = _config(tmp_path, {"a": {}, "b": {}})
    async with running(config, gpu.env(), probe=probe) as run, client(run) as http:
        await _post_all(http, "a", "b")
        states = {n: i.state for n, i in run.supervisor.instances.items()}
        held = {n: run.supervisor.status(i).held_bytes for n, i in run.supervisor.instances.items()}
        account = next(a for a in run.supervisor.accounts() if a.name == "0")
        history = list(run.events.history)
        transport = httpx.AsyncHTTPTransport(uds=str(run.control_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://vllmd") as control:
            status = (await control.get("/v1/status")).json()
    assert states == {"a": S.READY, "b": S.READY}
    assert held == {"a": 8 * GiB, "b": 8 * GiB}
    assert account.foreign == 0
    unseen = _events(history, "gpu_pids_unseen")
    assert [(e.fields["device"], e.fields["why"]) for e in unseen] == [("0", WHY[pids])]
    expected = "pid namespace" if pids == "namespace" else "no per-process memory"
    assert expected in unseen[0].fields["cause"] and unseen[0].fields["fix"]
    assert not _events(history, "measured") and not _events(history, "evicted")
    # The control API says it per device, and doctor FAILs a pid namespace with the fix (a
    # driver without a process list WARNs: nothing to change in the unit).
    device = next(d for d in status["devices"] if d["name"] == "0")
    assert device["pids_unseen"]["why"] == unseen[0].fields["why"]
    check = attribution_check(status, {})
    assert check.status == ("FAIL" if pids == "namespace" else "WARN")
    assert check.fix == unseen[0].fields["fix"]
    assert ("--pid=host" in check.fix) == (pids == "namespace")
    assert ("nothing to fix in vllmd's unit" in check.fix) == unlisted


@pytest.mark.parametrize("foreign", [False, True])
async def test_a_reading_that_misses_our_engine_once_is_no_lasting_finding(
    tmp_path: Path, foreign: bool
) -> None:
    """Defect: a's footprint measured on a reading that lists none of its pids (as when the
    engine dies right after READY) made a pid-namespace finding that never went away. An
    empty list makes none; one listing only a foreign process makes it until a reading shows
    our engines' pids again (b's start here), and the GPU is measured as usual after it."""
    gpu = FakeGpu(tmp_path / "gpu")
    if foreign:
        gpu.add_foreign(GiB)
    probe = _Driver(gpu)
    config = _config(tmp_path, {"a": {}, "b": {"memory": "6GiB"}})
    async with running(config, gpu.env(), probe=probe) as run, client(run) as http:
        probe.hiding = True
        await _post_all(http, "a")
        during = next(a for a in run.supervisor.accounts() if a.name == "0")
        probe.hiding = False
        await _post_all(http, "b")
        after = next(a for a in run.supervisor.accounts() if a.name == "0")
        history = list(run.events.history)
    unseen = _events(history, "gpu_pids_unseen")
    assert [e.fields["why"] for e in unseen] == (["pid_namespace"] if foreign else [])
    assert (during.pids_unseen is not None) == foreign
    assert after.pids_unseen is None
    assert after.foreign == pytest.approx(GiB if foreign else 0, abs=64 * MiB)
    assert [e.model for e in _events(history, "measured")] == ["b"]


async def test_foreign_memory_on_a_gpu_without_a_process_list_is_what_vllmd_does_not_hold(
    tmp_path: Path,
) -> None:
    """No process list, no engine measured yet: memory in use is not vllmd's (read as no
    process at all, it was none of anybody's: 0 foreign)."""
    gpu = FakeGpu(tmp_path / "gpu")
    gpu.add_foreign(3 * GiB)
    config = _config(tmp_path, {"a": {}})
    async with running(config, gpu.env(), probe=_Driver(gpu, listed=False)) as run:
        await gpu.wait_for(lambda s: bool(s["0"].processes))
        account = next(a for a in run.supervisor.accounts() if a.name == "0")
    assert account.foreign == 3 * GiB and account.pids_unseen is None


async def test_foreign_memory_is_still_seen_when_pids_are_not(tmp_path: Path) -> None:
    gpu = FakeGpu(tmp_path / "gpu", pids="namespace")
    config = _config(tmp_path, {"a": {}})
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a")
        gpu.add_foreign(3 * GiB)
        await gpu.wait_for(lambda s: len(s["0"].processes) == 2)
        account = next(a for a in run.supervisor.accounts() if a.name == "0")
    assert account.foreign == pytest.approx(3 * GiB, abs=1 * GiB)


async def test_a_wake_teaches_no_overhead(tmp_path: Path) -> None:
    """Regression: a woken engine was measured against the fraction a cold start would get
    now (after its overhead was learned), so its overhead read ~0, and the next cold start
    went over its memory by its whole context."""
    gpu = _h100(tmp_path)
    async with running(_h100_config(tmp_path), gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")  # a sleeps for c
        await _post_all(http, "a")  # a wakes (b sleeps)
        await run.supervisor.unload(run.supervisor.instances["a"])
        await _post_all(http, "a")  # a cold start with what it learned
        history = list(run.events.history)
    measured = [e.fields for e in _events(history, "measured", "a")]
    assert len(measured) == 3
    assert [("overhead_bytes" in m) for m in measured] == [True, False, True]
    assert measured[2]["over_reservation_bytes"] == 0
    assert measured[2]["used_bytes"] <= 38 * GiB + 64 * MiB
