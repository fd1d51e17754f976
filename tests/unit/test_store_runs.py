"""The runs of a state dir: each store open lists its run (durably, before any engine could be
spawned), the next run reads the earlier ones of this boot and never itself, and engine
markers name their run unambiguously whatever the model's name."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from tests.fakes.clock import SkipClock
from tests.integration.harness import eventually
from vllmd.engine.process import boot_id
from vllmd.events import EventBus, Kind
from vllmd.overrides import Overrides
from vllmd.store import StateStore, schema
from vllmd.store import records as state_db
from vllmd.store.runs import KEEP, Runs, engine_marker, listed, model_of, run_of

pytestmark = pytest.mark.anyio


def _store(directory: Path, **kw: object) -> StateStore:
    clock = SkipClock(time.time)
    return StateStore(directory, retention=lambda: 86400.0, clock=clock, **kw)  # type: ignore[arg-type]


def _listed(directory: Path) -> list[list[str]]:
    """The runs as another process reads them from the file."""
    with sqlite3.connect(f"file:{directory / 'vllmd.db'}?mode=ro", uri=True) as conn:
        (value,) = conn.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()
    runs: list[list[str]] = json.loads(value)
    return runs


async def test_a_run_is_listed_with_its_boot_when_the_store_opens(tmp_path: Path) -> None:
    """Written by open itself (nothing drained, no writer running): a daemon killed right
    after it spawned its first engine has its run on the file."""
    store = _store(tmp_path)
    await store.open()
    assert _listed(tmp_path) == [[store.runs.current, boot_id()]]
    assert store.runs.on_this_boot() == frozenset()


async def test_the_next_run_sees_the_earlier_runs_of_this_boot_never_its_own(
    tmp_path: Path,
) -> None:
    first = _store(tmp_path)
    await first.open()  # and killed: never drained
    second = _store(tmp_path)
    await second.open()
    assert second.runs.on_this_boot() == {first.runs.current}
    third = _store(tmp_path)
    await third.open()
    assert third.runs.on_this_boot() == {first.runs.current, second.runs.current}
    assert third.runs.current not in third.runs.on_this_boot()


async def test_a_run_that_stopped_cleanly_is_not_scanned_for_at_the_next_start(
    tmp_path: Path,
) -> None:
    """Drained and closed (every event written, its engines stopped or recorded): the next
    start reads no process's environment for it; one killed before is still looked for."""
    killed = _store(tmp_path)
    await killed.open()
    clean = _store(tmp_path)
    await clean.open()
    await clean.drain()
    assert _listed(tmp_path)[-1] == [clean.runs.current, boot_id(), "ended"]
    after = _store(tmp_path)
    await after.open()
    assert after.runs.on_this_boot() == {killed.runs.current}


def test_runs_of_another_boot_are_listed_but_not_on_this_boot(tmp_path: Path) -> None:
    conn, _ = schema.connect(tmp_path / "vllmd.db")
    Runs("aaaaaaaa", boot="another-boot").begin(conn)
    later = Runs()
    later.begin(conn)
    assert [r.id for r in later.earlier] == ["aaaaaaaa"]
    assert later.on_this_boot() == frozenset()
    conn.close()


def test_only_the_last_runs_are_kept(tmp_path: Path) -> None:
    conn, _ = schema.connect(tmp_path / "vllmd.db")
    ids = [f"{i:08x}" for i in range(KEEP + 5)]
    for run in ids:
        Runs(run).begin(conn)
    assert [r.id for r in listed(conn)] == ids[-KEEP:]
    conn.close()


def test_a_runs_value_of_another_shape_lists_no_runs(tmp_path: Path) -> None:
    conn, _ = schema.connect(tmp_path / "vllmd.db")
    for value in ("not json", '{"a": 1}', '[["a"], [1, 2], "x"]'):
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('runs', ?)", (value,))
        assert listed(conn) == []
    runs = Runs()
    runs.begin(conn)  # and a run lists itself over it
    assert [r.id for r in listed(conn)] == [runs.current]
    conn.close()


async def test_a_file_that_is_no_database_lists_no_earlier_runs(tmp_path: Path) -> None:
    (tmp_path / "vllmd.db").write_bytes(b"garbage" * 1000)
    store = _store(tmp_path)
    await store.open()
    assert store.runs.on_this_boot() == frozenset()
    assert _listed(tmp_path) == [[store.runs.current, boot_id()]]  # on the new file


async def test_a_database_this_run_cannot_write_still_tells_the_earlier_runs(
    tmp_path: Path,
) -> None:
    first = _store(tmp_path)
    await first.open()  # and killed
    with sqlite3.connect(tmp_path / "vllmd.db") as conn:  # now a newer vllmd's
        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    second = _store(tmp_path)
    await second.open()
    assert second.degraded()
    assert second.runs.on_this_boot() == {first.runs.current}  # read, read-only


async def test_a_new_file_for_a_corrupt_one_lists_this_run_and_the_earlier_ones_again(
    tmp_path: Path,
) -> None:
    broken = [False]

    def flaky_write(*args: object) -> None:
        if broken[0]:
            broken[0] = False
            raise sqlite3.DatabaseError("database disk image is malformed")
        state_db.write(*args)  # type: ignore[arg-type]

    first = _store(tmp_path)
    await first.open()
    await first.drain()
    store = _store(tmp_path, write=flaky_write)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(store.run, bus, Overrides())
        broken[0] = True
        bus.emit(Kind.CONTROL, "a", action="pin")
        await eventually(lambda: list(tmp_path.glob("vllmd.db.corrupt-*")), 10)
        await store.drain()
        tg.cancel_scope.cancel()
    assert [r[0] for r in _listed(tmp_path)] == [first.runs.current, store.runs.current]


@pytest.mark.parametrize("model", ["m", "llama-3.1-8b", "a.b-c_d", "0"])
def test_a_marker_names_its_run_and_model_whatever_the_name(model: str) -> None:
    marker = engine_marker("0123abcd", model)
    assert run_of(marker) == "0123abcd"
    assert model_of(marker) == model
    assert marker != engine_marker("0123abcd", model)  # one engine's, not the run's


@pytest.mark.parametrize("marker", ["", "m-0123456789ab", "llama-3.1-8b-0123456789ab", "zz.m.x"])
def test_a_marker_of_another_form_names_no_run(marker: str) -> None:
    """Markers of an older vllmd ("<model>-<hex>"), where a model's name may hold a '.'."""
    assert run_of(marker) is None
    assert model_of(marker) == ""
