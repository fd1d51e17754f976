"""A reload that shrinks a device, as tables: `plan_fit` picks what to evict so every shrunk
device fits again (issue 21 item 4); and `Locks.released`, which its carrying out waits on."""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import pytest

from tests.unit.test_scheduler import GB, NOW, dev, mod, snap
from vllmd.instance.states import InstanceState
from vllmd.placement.locks import Locks
from vllmd.placement.scheduler import Snapshot
from vllmd.placement.shrink import plan_fit

S = InstanceState


def planned(s: Snapshot, over: Mapping[str, int]) -> list[tuple[str, str, str, int]]:
    return [(e.model, e.action, e.reason, e.level) for e in plan_fit(s, over)]


def test_idle_models_go_before_busy_and_recent_ones_least_recently_used_first() -> None:
    """Over by 6 GB: the two idle models (LRU first) cover it; the busy and the recently used
    one stay."""
    s = snap(
        mod("old", 3, S.READY, last_used=NOW - 900),
        mod("older", 3, S.READY, last_used=NOW - 1800),
        mod("busy", 3, S.READY, in_flight=2),
        mod("recent", 3, S.READY, last_used=NOW - 1),
    )
    assert planned(s, {"0": 6 * GB}) == [
        ("older", "stop", "reload", 0),
        ("old", "stop", "reload", 0),
    ]


def test_busy_and_recent_models_are_stopped_when_the_idle_ones_are_not_enough() -> None:
    """Over by 6 GB with one idle model: then the recently used (idle) one, before the busy."""
    s = snap(
        mod("idle", 3, S.READY),
        mod("busy", 3, S.READY, in_flight=1, last_used=NOW - 100),
        mod("recent", 3, S.READY, last_used=NOW - 1),
    )
    assert planned(s, {"0": 6 * GB}) == [
        ("idle", "stop", "reload", 0),
        ("recent", "stop", "reload", 0),
    ]
    assert planned(s, {"0": 7 * GB})[-1] == ("busy", "stop", "reload", 0)


def test_pinned_models_and_models_in_an_operation_are_never_victims() -> None:
    """Whatever is short, pinned and busy (locked) models stay; the rest goes (as near a fit
    as it gets)."""
    s = snap(
        mod("pinned", 3, S.READY, pinned=True),
        mod("locked", 3, S.READY, busy=True),
        mod("free", 3, S.READY, in_flight=1),
        mod("stopped", 3),
    )
    assert planned(s, {"0": 9 * GB}) == [("free", "stop", "reload", 0)]


def test_a_victim_not_needed_once_others_cover_is_dropped() -> None:
    """A small LRU model taken first is dropped when the larger one alone covers the deficit."""
    s = snap(mod("small", 1, S.READY, last_used=NOW - 5000), mod("large", 8, S.READY))
    assert planned(s, {"0": 5 * GB}) == [("large", "stop", "reload", 0)]


def test_only_the_shrunk_devices_count() -> None:
    """A model on another device is left alone; one spanning both frees on the shrunk one."""
    devices = (dev("0"), dev("1"))
    s = snap(
        mod("elsewhere", 3, S.READY, devices=("1",), last_used=NOW - 3000),
        mod("both", 3, S.READY, devices=("0", "1")),
        devices=devices,
    )
    assert planned(s, {"0": 2 * GB}) == [("both", "stop", "reload", 0)]


def test_an_idle_victim_sleeps_where_its_residue_still_lets_the_device_fit() -> None:
    """evict_to = sleep: an idle model that can sleep does, when what it keeps still fits; a
    busy one is stopped."""
    sleeper = mod("sleeper", 8, S.READY, sleep_level=2, residue=GB)
    s = snap(sleeper, mod("busy", 8, S.READY, in_flight=1, sleep_level=2), evict_to="sleep")
    assert planned(s, {"0": 6 * GB}) == [("sleeper", "sleep", "reload", 2)]
    assert planned(s, {"0": 10 * GB}) == [
        ("sleeper", "sleep", "reload", 2),
        ("busy", "stop", "reload", 0),
    ]
    assert planned(s, {"0": 16 * GB}) == [
        ("sleeper", "stop", "reload", 0),
        ("busy", "stop", "reload", 0),
    ]


def test_a_sleeping_model_is_stopped_for_its_residue() -> None:
    s = snap(mod("asleep", 8, S.SLEEPING, residue=2 * GB))
    (ev,) = plan_fit(s, {"0": GB})
    assert (ev.model, ev.action, ev.reason, dict(ev.frees)) == (
        "asleep",
        "stop",
        "reload",
        {"0": 2 * GB},
    )


@pytest.mark.anyio
async def test_locks_released_returns_once_a_hold_is_let_go() -> None:
    locks = Locks()
    hold = locks.hold(["0"])
    done = anyio.Event()

    async def wait() -> None:
        await locks.released()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        hold.release()
        with anyio.fail_after(1):
            await done.wait()
