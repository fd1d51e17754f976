"""The state store on a real SQLite file: every event of a burst in order, ids continued across
restarts, engine records and desired state kept, retention, and each way a database fails
(locked, corrupt, full, newer schema, a stalled disk) degrading the store, never raising."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from tests.fakes.clock import SkipClock
from tests.integration.harness import eventually
from vllmd.config import ModelConfig
from vllmd.events import EventBus, Kind
from vllmd.overrides import Overrides
from vllmd.store import StateStore, schema
from vllmd.store import records as state_db
from vllmd.store.db import BOUND, DEGRADED_HOLD
from vllmd.store.records import Desired, EngineRecord, HostMeasured, Overhead, Row

pytestmark = pytest.mark.anyio
DAY = 86400.0


def _store(directory: Path, clock: SkipClock | None = None, **kw: object) -> StateStore:
    return StateStore(
        directory,
        retention=lambda: 30 * DAY,
        clock=clock or SkipClock(time.time),
        **kw,  # type: ignore[arg-type]
    )


def _rows(directory: Path) -> list[tuple[int, str, str | None]]:
    """The stored events (none while there is no database: a read never makes one)."""
    try:
        with sqlite3.connect(f"file:{directory / 'vllmd.db'}?mode=ro", uri=True) as conn:
            return list(conn.execute("SELECT id, kind, model FROM events ORDER BY id"))
    except sqlite3.OperationalError:
        return []


async def _running(
    store: StateStore,
    bus: EventBus,
    overrides: Overrides | None = None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    await store.run(bus, overrides or Overrides(), task_status=task_status)


async def test_a_burst_of_10000_events_is_stored_in_order_with_contiguous_ids(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        for i in range(10_000):
            bus.emit(Kind.STATE, f"m{i % 7}", old="stopped", new="starting", n=i)
        await store.drain(timeout=30)
        tg.cancel_scope.cancel()
    rows = _rows(tmp_path)
    assert [r[0] for r in rows] == list(range(1, 10_001))
    assert bus.dropped["store"] == 0
    assert not store.degraded()


async def test_event_ids_continue_after_a_restart(tmp_path: Path) -> None:
    for run in range(2):
        store = _store(tmp_path)
        await store.open()
        bus = EventBus(next_id=store.next_id)
        async with anyio.create_task_group() as tg:
            await tg.start(_running, store, bus)
            ids = [bus.emit(Kind.CONTROL, "m", action="load", run=run).id for _ in range(3)]
            await store.drain()
            tg.cancel_scope.cancel()
        assert ids == [run * 3 + 1, run * 3 + 2, run * 3 + 3]
    assert [r[0] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


async def test_engine_records_follow_spawned_and_stopped_events(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    spawned = dict(pgid=4242, start_time=123.5, boot_id="boot-a", address="unix:/x")
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        bus.emit(Kind.SPAWNED, "a", pid=4242, **spawned)
        bus.emit(Kind.SPAWNED, "b", pid=4343, **{**spawned, "pgid": 4343})
        bus.emit(Kind.STATE, "b", old="stopping", new="stopped")
        await store.drain()
        tg.cancel_scope.cancel()
    again = _store(tmp_path)
    await again.open()
    assert again.engines == [EngineRecord("a", 4242, 4242, 123.5, "boot-a", "unix:/x")]
    await again.forget_engines(["a"])
    third = _store(tmp_path)
    await third.open()
    assert third.engines == []


async def test_desired_state_is_written_on_every_change_and_read_back(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.open()
    bus, overrides = EventBus(next_id=store.next_id), Overrides()
    model = ModelConfig(name="a", model="/m/a", memory=2**30)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus, overrides)
        overrides.pin(model)
        overrides.mark_loaded("b")

        def written() -> bool:
            with sqlite3.connect(tmp_path / "vllmd.db") as conn:
                (count,) = conn.execute("SELECT COUNT(*) FROM loaded_on_purpose").fetchone()
                return bool(count == 1)

        await eventually(written)  # no event needed: the change itself is written
        await store.drain()
        tg.cancel_scope.cancel()
    again = _store(tmp_path)
    await again.open()
    assert again.desired == Desired({"a": False}, frozenset({"b"}))


async def test_old_events_are_pruned_at_open_and_the_newest_keeps_the_ids(tmp_path: Path) -> None:
    clock = SkipClock(time.time)
    store = _store(tmp_path, clock)
    await store.open()
    bus = EventBus(next_id=store.next_id, clock=lambda: time.time() - 40 * DAY)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        for _ in range(3):
            bus.emit(Kind.CONTROL, "m", action="load")
        await store.drain()
        tg.cancel_scope.cancel()
    again = StateStore(tmp_path, retention=lambda: 30 * DAY)
    await again.open()
    assert [r[0] for r in _rows(tmp_path)] == [3]  # the newest stays: it holds the last id
    assert again.next_id() == 4
    await again.drain()


async def test_a_corrupt_file_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    (tmp_path / "vllmd.db").write_bytes(b"this is not an sqlite database " * 200)
    clock = SkipClock(time.time)
    store = _store(tmp_path, clock)
    await store.open()
    aside = list(tmp_path.glob("vllmd.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert store.degraded()  # visible for a while: the log before it is gone
    first = store.next_id()
    assert first > int(time.time() * 1000) - 60_000  # ids continue from the clock, not from 1
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        bus.emit(Kind.CONTROL, "m", action="load")
        await store.drain()
        tg.cancel_scope.cancel()
    assert [r[1] for r in _rows(tmp_path)] == ["control"]
    clock.skip(DEGRADED_HOLD + 1)
    assert not store.degraded()


async def test_a_locked_database_degrades_then_recovers_with_nothing_lost(tmp_path: Path) -> None:
    clock = SkipClock(time.time)
    store = _store(tmp_path, clock)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    holder = sqlite3.connect(tmp_path / "vllmd.db", isolation_level=None)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
        for i in range(5):
            bus.emit(Kind.STATE, "m", old="stopped", new="starting", n=i)
        await eventually(store.degraded, timeout=15)  # after the busy timeout
        holder.execute("ROLLBACK")
        holder.close()
        await eventually(lambda: len(_rows(tmp_path)) == 5, timeout=30)
        # The rows are visible once the writer thread commits; the store hears of the success
        # when the thread hands back. Drain waits for that (and for nothing in flight).
        await store.drain()
        clock.skip(DEGRADED_HOLD + 1)
        assert not store.degraded()
        tg.cancel_scope.cancel()
    assert [r[0] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]


async def test_a_full_database_degrades_and_the_daemon_side_keeps_going(tmp_path: Path) -> None:
    store = _store(tmp_path, max_pages=12)  # "disk full" once the file reaches 12 pages
    await store.open()
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        for i in range(2000):
            bus.emit(Kind.STATE, "m", old="stopped", new="starting", n=i, pad="x" * 200)
        await eventually(store.degraded, timeout=15)
        assert bus.emit(Kind.CONTROL, "m", action="load").id == 2001  # emit never fails
        await store.drain(timeout=0.5)
        tg.cancel_scope.cancel()


async def test_a_database_of_a_newer_schema_is_left_alone_and_the_store_degraded(
    tmp_path: Path,
) -> None:
    with sqlite3.connect(tmp_path / "vllmd.db") as conn:
        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    store = _store(tmp_path)
    await store.open()
    assert store.degraded()
    assert not list(tmp_path.glob("*.corrupt-*"))  # not corrupt: kept for the newer vllmd
    assert store.next_id() > int(time.time() * 1000) - 60_000


async def test_a_stalled_disk_overflows_the_bound_counted_and_degraded_never_blocking(
    tmp_path: Path,
) -> None:
    stall = threading.Event()

    def slow_write(
        conn: sqlite3.Connection,
        rows: Sequence[Row],
        engines: Mapping[str, EngineRecord | None],
        desired: Desired | None,
        id_floor: int | None,
    ) -> None:
        stall.wait(30)
        state_db.write(conn, rows, engines, desired, id_floor)

    store = _store(tmp_path, write=slow_write)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    total = 3 * BOUND
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        for i in range(total):
            bus.emit(Kind.STATE, "m", old="stopped", new="starting", n=i)
            if i % 1000 == 0:
                await anyio.lowlevel.checkpoint()  # the store's pump runs, as in the daemon
        assert bus.dropped["store"] > 0
        assert store.degraded()
        stall.set()
        await store.drain(timeout=60)
        tg.cancel_scope.cancel()
    ids = [r[0] for r in _rows(tmp_path)]
    assert ids == sorted(ids) and len(ids) == total - bus.dropped["store"]
    assert ids[0] == 1


def test_migrations_bring_a_new_file_to_the_current_schema(tmp_path: Path) -> None:
    conn, fresh = schema.connect(tmp_path / "vllmd.db")
    assert not fresh
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "engines", "pins", "loaded_on_purpose"} <= tables
    conn.close()


def _stalling(stall: threading.Event) -> object:
    def slow_write(*args: object) -> None:
        stall.wait(60)
        state_db.write(*args)  # type: ignore[arg-type]

    return slow_write


async def test_a_hung_disk_neither_hangs_shutdown_nor_hides(tmp_path: Path) -> None:
    stall = threading.Event()
    clock = SkipClock(time.time)
    store = _store(tmp_path, clock, write=_stalling(stall))
    await store.open()
    bus = EventBus(next_id=store.next_id)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(_running, store, bus)
                bus.emit(Kind.CONTROL, "m", action="load")
                await eventually(lambda: store._write_since is not None)
                assert not store.degraded()  # a write that just began is not a stall
                clock.skip(10)
                assert store.degraded()  # one that has run for 10 s is
                await store.drain(timeout=1)  # bounded, though the write never ends
                tg.cancel_scope.cancel()  # and the write loop does not wait for it either
    finally:
        stall.set()


async def test_ids_handed_out_but_never_written_are_not_handed_out_again(tmp_path: Path) -> None:
    stall = threading.Event()
    store = _store(tmp_path, write=_stalling(stall))
    await store.open()
    bus = EventBus(next_id=store.next_id)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_running, store, bus)
            seen = [bus.emit(Kind.CONTROL, "m", action="load").id for _ in range(3)]
            tg.cancel_scope.cancel()  # the daemon dies with them unwritten
    finally:
        stall.set()
    again = _store(tmp_path)
    await again.open()
    assert again.next_id() > max(seen)


async def test_an_event_emitted_just_before_drain_is_written(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus)
        await anyio.sleep(0.05)  # the pump waits on the stream: the event goes straight to it
        bus.emit(Kind.CONTROL, "m", action="load")
        await store.drain()
        tg.cancel_scope.cancel()
    assert [r[1] for r in _rows(tmp_path)] == ["control"]


async def test_corruption_found_mid_run_starts_a_new_file_with_this_runs_state(
    tmp_path: Path,
) -> None:
    broken = [False]

    def flaky_write(*args: object) -> None:
        if broken[0]:
            broken[0] = False
            raise sqlite3.DatabaseError("database disk image is malformed")
        state_db.write(*args)  # type: ignore[arg-type]

    store = _store(tmp_path, write=flaky_write)
    await store.open()
    bus, overrides = EventBus(next_id=store.next_id, history=1), Overrides()
    spawned = {"pid": 77, "pgid": 77, "start_time": 1.0, "boot_id": "b", "marker": "x"}
    async with anyio.create_task_group() as tg:
        await tg.start(_running, store, bus, overrides)
        bus.emit(Kind.SPAWNED, "a", **spawned)
        overrides.mark_loaded("a")
        await eventually(lambda: len(_rows(tmp_path)) == 1)
        broken[0] = True
        bus.emit(Kind.CONTROL, "a", action="pin")
        await eventually(lambda: list(tmp_path.glob("vllmd.db.corrupt-*")), 10)
        bus.emit(Kind.CONTROL, "a", action="unpin")
        await eventually(lambda: len(_rows(tmp_path)) == 2, 10)
        read = await store.events(limit=10, newest=True)  # from the new file, not the old one
        assert [e["action"] for e in read] == ["pin", "unpin"]
        await store.drain()
        tg.cancel_scope.cancel()
    again = _store(tmp_path)
    await again.open()
    assert [e.pid for e in again.engines] == [77]  # still running: recorded again
    assert again.desired.loaded_on_purpose == {"a"}


async def test_a_database_this_run_could_not_open_keeps_its_desired_state(
    tmp_path: Path,
) -> None:
    first = _store(tmp_path)
    await first.open()
    bus, overrides = EventBus(next_id=first.next_id), Overrides()
    async with anyio.create_task_group() as tg:
        await tg.start(_running, first, bus, overrides)
        overrides.mark_loaded("a")
        await first.drain()
        tg.cancel_scope.cancel()
    with sqlite3.connect(tmp_path / "vllmd.db") as conn:  # now a newer vllmd's
        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    second = _store(tmp_path)
    await second.open()
    assert second.degraded() and second.desired.loaded_on_purpose == {"a"}  # read, read-only
    bus, overrides = EventBus(next_id=second.next_id), Overrides()
    async with anyio.create_task_group() as tg:
        await tg.start(_running, second, bus, overrides)
        overrides.mark_loaded("b")
        await anyio.sleep(0.3)
        await second.drain(timeout=1)
        tg.cancel_scope.cancel()
    with sqlite3.connect(tmp_path / "vllmd.db") as conn:
        assert [m for (m,) in conn.execute("SELECT model FROM loaded_on_purpose")] == ["a"]


def test_each_models_last_learned_gpu_overhead_is_read_back(tmp_path: Path) -> None:
    """The overhead a cold start measured (event `measured`) outlives the daemon: the newest
    one per model is read at open, with its GPU count; measurements without it (cpu engines,
    wakes) are not overheads."""
    conn, _ = schema.connect(tmp_path / schema.FILENAME)
    rows = [
        (1, "measured", "a", {"used_bytes": 10, "overhead_bytes": 700, "gpus": 1}),
        (2, "measured", "b", {"used_bytes": 10}),
        (3, "state", "a", {"new": "ready"}),
        (4, "measured", "a", {"used_bytes": 10, "overhead_bytes": 512, "gpus": 2}),
        (5, "measured", "a", {"used_bytes": 10}),  # a wake's: no overhead learned
        (6, "measured", "c", {"overhead_bytes": 600, "gpus": 1, "device_type": "NVIDIA H100"}),
        (7, "sleep_measured", "a", {"level": 1, "host_bytes": 3 * 2**30}),
        (8, "sleep_measured", "a", {"level": 1, "host_bytes": 2 * 2**30, "fingerprint": "f0"}),
        (9, "sleep_measured", "b", {"level": 1, "host_bytes": 0}),  # nothing: not kept
        (10, "sleep_measured", "d", {"level": 1, "host_bytes": 5}),  # an older vllmd's
    ]
    with conn:
        conn.executemany(
            "INSERT INTO events (id, time, kind, model, fields) VALUES (?, 0, ?, ?, ?)",
            [(i, kind, model, json.dumps(fields)) for i, kind, model, fields in rows],
        )
    assert state_db.overheads(conn) == {
        "a": Overhead(512, 2),  # learned before the device type was kept: fits any type
        "c": Overhead(600, 1, "NVIDIA H100"),
    }
    assert state_db.host_measured(conn) == {
        "a": HostMeasured(2 * 2**30, "f0"),
        "d": HostMeasured(5, None),  # still read: the placer trusts it for no weights
    }
    conn.close()


@pytest.mark.parametrize(
    ("gpus", "device_type", "fits"),
    [
        (1, "NVIDIA H100", True),
        (1, "NVIDIA A100", False),  # another type: its context differs
        (2, "NVIDIA H100", False),  # another GPU count: NCCL's buffers differ
        (1, None, True),  # the type not known now: the count decides
    ],
)
def test_a_learned_overhead_holds_for_the_same_gpu_count_and_type(
    gpus: int, device_type: str | None, fits: bool
) -> None:
    assert Overhead(600, 1, "NVIDIA H100").fits(gpus, device_type) is fits
