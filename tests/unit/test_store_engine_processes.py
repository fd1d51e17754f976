"""An engine's processes beside its leader in its record (issue 21, item 7): written as the daemon
tells them, before or after the record itself, kept across a failed write and a database of the
previous schema; and at recovery a recorded process counts only with its recorded start time."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus

from tests.integration.harness import eventually
from vllmd.events import EventBus, Kind
from vllmd.overrides import Overrides
from vllmd.store import EngineRecord, StateStore
from vllmd.store.processes import EngineProcesses, Seen
from vllmd.store.recovery import descendants_alive
from vllmd.store.schema import MIGRATIONS, SCHEMA_VERSION, connect

pytestmark = pytest.mark.anyio
SPAWNED = {"pid": 100, "pgid": 100, "start_time": 5.25, "boot_id": "b", "marker": "m-1"}


def _store(directory: Path) -> StateStore:
    return StateStore(directory, retention=lambda: 86400.0)


async def _running(
    store: StateStore, bus: EventBus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    await store.run(bus, Overrides(), task_status=task_status)


def _row(directory: Path, model: str) -> tuple[str, float] | None:
    """The engine record's processes (as stored) and spawned_at."""
    with sqlite3.connect(f"file:{directory / 'vllmd.db'}?mode=ro", uri=True) as conn:
        found = conn.execute(
            "SELECT descendants, spawned_at FROM engines WHERE model = ?", (model,)
        ).fetchone()
    return None if found is None else (str(found[0]), float(found[1]))


def test_a_recorded_process_counts_only_with_its_recorded_start_time() -> None:
    """A pid reused by another program (alive, another start time) is never the engine's."""
    record = EngineRecord("m", 100, 100, 5.0, "b", descendants=((201, 7.5), (202, 8.0), (203, 9.0)))
    running = {201: 7.505, 202: 31.0, 100: 5.0}  # 202 reused later; 203 gone
    assert descendants_alive(record, running) == {201: 7.505}
    assert descendants_alive(EngineRecord("m", 100, 100, 5.0, "b"), running) == {}


async def test_processes_told_before_and_after_the_record_is_written_go_into_it(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        store.note_descendants(100, 5.25, {201: 7.5})  # seen before `spawned` is written
        bus.emit(Kind.SPAWNED, "m", **SPAWNED)
        await eventually(lambda: (_row(tmp_path, "m") or ("",))[0] == '{"201": 7.5}')
        first = _row(tmp_path, "m")
        store.note_descendants(100, 5.25, {201: 7.5, 202: 8.25})
        store.note_descendants(999, 1.0, {300: 2.0})  # another engine's: no record of it yet
        await eventually(lambda: (_row(tmp_path, "m") or ("",))[0] == '{"201": 7.5, "202": 8.25}')
        assert first is not None and (_row(tmp_path, "m") or ("", 0.0))[1] == first[1]
        store.note_descendants(100, 5.25, None)  # the engine is gone; its stop follows
        bus.emit(Kind.STATE, "m", old="stopping", new="stopped")
        await eventually(lambda: _row(tmp_path, "m") is None)
        await store.drain()
        tg.cancel_scope.cancel()
    again = _store(tmp_path)
    await again.open()
    assert again.engines == []


async def test_a_restart_reads_the_processes_of_the_engines_left_running(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        bus.emit(Kind.SPAWNED, "m", **SPAWNED)
        store.note_descendants(100, 5.25, {202: 8.25, 201: 7.5})
        await eventually(lambda: (_row(tmp_path, "m") or ("{}",))[0] != "{}")
        tg.cancel_scope.cancel()  # a crash: no drain
    again = _store(tmp_path)
    await again.open()
    [record] = again.engines
    assert record.descendants == ((201, 7.5), (202, 8.25))
    assert (record.pid, record.start_time, record.marker) == (100, 5.25, "m-1")


def test_what_a_failed_write_carried_is_written_again() -> None:
    processes = EngineProcesses()
    processes.note((1, 1.0), {2: 2.0})
    processes.note((3, 3.0), {4: 4.0})
    seen = processes.take()
    assert not processes.changed
    processes.note((3, 3.0), None)  # gone meanwhile: never written again
    processes.failed(seen)
    assert processes.take().changed == {(1, 1.0)}
    processes.note((1, 1.0), {2: 2.0})  # told again, unchanged: nothing to write
    assert not processes.changed


def test_only_records_whose_processes_changed_are_written_again() -> None:
    live = {
        "a": EngineRecord("a", 1, 1, 1.0, "b"),
        "b": EngineRecord("b", 5, 5, 5.0, "b"),
    }
    seen = Seen({(1, 1.0): ((2, 2.0),), (9, 9.0): ((10, 10.0),)}, frozenset({(1, 1.0)}))
    spawned = EngineRecord("c", 9, 9, 9.0, "b")
    out = seen.apply({"c": spawned, "b": None}, live)
    assert out == {
        "a": EngineRecord("a", 1, 1, 1.0, "b", descendants=((2, 2.0),)),
        "b": None,
        "c": EngineRecord("c", 9, 9, 9.0, "b", descendants=((10, 10.0),)),
    }


def test_a_database_of_the_previous_schema_gains_the_processes_column(tmp_path: Path) -> None:
    path = tmp_path / "vllmd.db"
    with sqlite3.connect(path) as old:
        for number, migration in enumerate(MIGRATIONS[:2]):
            old.executescript(migration)
            old.execute(f"PRAGMA user_version = {number + 1}")
        old.execute(
            "INSERT INTO engines VALUES ('m', 100, 100, 5.25, 'b', '', 'm-1', ?)", (time.time(),)
        )
    conn, fresh = connect(path)
    assert not fresh
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()
    store = _store(tmp_path)
    anyio.run(store.open)
    assert store.engines == [EngineRecord("m", 100, 100, 5.25, "b", "", "m-1")]
    anyio.run(store.drain)
