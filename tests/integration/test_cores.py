"""cpu engines on their own cores: each start gets a disjoint slice of its device's `cpus`
(VLLM_CPU_OMP_THREADS_BIND and the process's affinity), and a start short of cores evicts
the least recently used engine although memory has room (fake engines, real processes)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from tests.integration.harness import client, fake_config, running
from vllmd.config.cpus import cpulist
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
S = InstanceState
CORES = sorted(os.sched_getaffinity(0))[:2]


def _bound(pgid: int | None) -> tuple[str, list[int]]:
    """The engine's OMP binding and its process's affinity."""
    assert pgid is not None
    process = psutil.Process(pgid)
    return process.environ().get("VLLM_CPU_OMP_THREADS_BIND", ""), process.cpu_affinity()


async def test_each_engine_gets_its_own_cores_and_a_third_evicts_by_lru(
    tmp_path: Path,
) -> None:
    assert len(CORES) == 2, "this test needs a host with two cores to give"
    config = fake_config(
        tmp_path,
        {name: {"cpus": 1} for name in ("a", "b", "c")},
        devices={"cpu0": {"kind": "cpu", "memory": "64GiB", "cpus": cpulist(CORES)}},
        scheduler={"min_residency": "0s"},
    )
    async with running(config, {}) as run, client(run) as http:
        a, b, c = (run.supervisor.instances[n] for n in "abc")
        for name in "ab":
            r = await http.post("/v1/completions", json={"model": name, "prompt": "x"})
            assert r.status_code == 200, r.text
        bound = {name: _bound(i.pgid()) for name, i in (("a", a), ("b", b))}
        assert {bound["a"][0], bound["b"][0]} == {str(CORES[0]), str(CORES[1])}
        assert bound["a"][1] == [int(bound["a"][0])] and bound["b"][1] == [int(bound["b"][0])]
        a.last_used = b.last_used = 0.0  # both idle long ago: a is the least recently used
        b.last_used = 1.0
        r = await http.post("/v1/completions", json={"model": "c", "prompt": "x"})
        assert r.status_code == 200, r.text
        assert (a.state, b.state, c.state) == (S.STOPPED, S.READY, S.READY)
        assert _bound(c.pgid())[0] == bound["a"][0]  # a's core came back and went to c
        evicted = [e for e in run.events.history if e.kind.value == "evicted"]
        assert [e.model for e in evicted] == ["a"]


async def test_a_model_with_cpus_0_is_neither_bound_nor_counted(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        {"a": {"cpus": 1}, "free": {"cpus": 0}},
        devices={"cpu0": {"kind": "cpu", "memory": "64GiB", "cpus": str(CORES[0])}},
    )
    async with running(config, {}) as run, client(run) as http:
        for name in ("a", "free"):
            r = await http.post("/v1/completions", json={"model": name, "prompt": "x"})
            assert r.status_code == 200, r.text
        free = run.supervisor.instances["free"]
        assert run.supervisor.instances["a"].state is S.READY  # one core, two engines
        assert _bound(free.pgid())[0] == ""
