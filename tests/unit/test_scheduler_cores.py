"""Cores fitted like memory on a cpu device: each engine takes `cpus` cores of its device's
slices, and a start short of cores evicts by the same LRU rules (placement/scheduler.py)."""

from __future__ import annotations

from tests.unit.test_scheduler import GB, NOW, dev, evicted, mod, snap
from vllmd.instance.states import InstanceState
from vllmd.placement.scheduler import Snapshot, plan_load

S = InstanceState
CPU = dev("cpu0", 64 * GB, cores=2)


def test_free_cores_count_only_running_engines_on_that_device() -> None:
    s = snap(
        mod("a", 3, S.READY, ("cpu0",), cores=1),
        mod("b", 3, S.STOPPED, ("cpu0",), cores=1),
        mod("c", 3, S.STARTING, ("cpu1",), cores=1),
        devices=(CPU, dev("cpu1", 64 * GB, cores=4)),
    )
    assert s.free_cores("cpu0") == 1 and s.free_cores("cpu1") == 3


def test_a_start_that_fits_memory_and_cores_starts() -> None:
    plan = snap(
        mod("a", 3, S.READY, ("cpu0",), cores=1),
        mod("b", 3, devices=("cpu0",), cores=1),
        devices=(CPU,),
    )
    assert plan_kind(plan, "b") == ("start", [])


def test_a_start_short_of_cores_evicts_the_least_recently_used() -> None:
    """Memory has room for all three; the device's two cores do not."""
    s = snap(
        mod("old", 3, S.READY, ("cpu0",), cores=1, last_used=NOW - 900),
        mod("new", 3, S.READY, ("cpu0",), cores=1, last_used=NOW - 600),
        mod("c", 3, devices=("cpu0",), cores=1),
        devices=(CPU,),
    )
    assert plan_kind(s, "c") == ("start", [("old", "stop", 0)])


def test_two_cores_wanted_evict_two_engines_of_one() -> None:
    s = snap(
        mod("a", 3, S.READY, ("cpu0",), cores=1),
        mod("b", 3, S.READY, ("cpu0",), cores=1),
        mod("wide", 3, devices=("cpu0",), cores=2),
        devices=(CPU,),
    )
    assert sorted(plan_kind(s, "wide")[1]) == [("a", "stop", 0), ("b", "stop", 0)]


def test_more_cores_than_the_device_has_is_rejected_naming_cores() -> None:
    s = snap(mod("wide", 3, devices=("cpu0",), cores=3), devices=(CPU,))
    plan = plan_load(s, "wide")
    assert plan.kind == "reject" and "short on cpu0 by 1 cores" in plan.why


def test_a_recently_used_engine_holding_the_cores_makes_the_start_wait() -> None:
    s = snap(
        mod("a", 3, S.READY, ("cpu0",), cores=2, last_used=NOW - 1),
        mod("b", 3, devices=("cpu0",), cores=1),
        devices=(CPU,),
    )
    assert plan_load(s, "b").kind == "wait"


def test_devices_without_counted_cores_fit_memory_only() -> None:
    s = snap(mod("a", 3, S.READY, cores=1), mod("b", 3, cores=1))  # a GPU: cores=0
    assert plan_kind(s, "b") == ("start", [])


def plan_kind(s: Snapshot, name: str) -> tuple[str, list[tuple[str, str, int]]]:
    plan = plan_load(s, name)
    return plan.kind, evicted(plan)
