"""The state store: vllmd's memory across restarts, `state_dir/vllmd.db` (records.py: schema).

It is a queued subscriber of the event bus (docs/design.md "State store"): events reach it through
the bus's bounded queue and are written in batches from a worker thread, so a slow or stalled disk
never slows a request or a transition; what it cannot keep up with overflows the bound and is
counted in `vllmd_events_dropped_total{subscriber="store"}`. From the events it keeps the engine
records crash recovery needs (a `spawned` event adds one, a stop removes it; `note_descendants`
its other processes), and from the `Overrides` the desired state (pins, models loaded on purpose).

It owns event ids (the bus's `next_id`). Each run reserves ids ahead in the file (a floor,
moved on as ids are used; set to the last id at a clean stop) and the next run starts past the
stored events and that floor: an id handed out but never written (a crash, a stalled disk) is
not handed out again. Where the stored ids are lost (a corrupt file moved aside) or
unreadable, ids continue from the clock in milliseconds: they still never go back.

A locked, corrupt or full database degrades the store, never the daemon: the batch is retried
with backoff (events queue behind it, up to the bound); `degraded()` is True (the gauge and the
`state_store_degraded` alert) while writes fail or one hangs, and for DEGRADED_HOLD after the
last problem, so a scrape still sees a short outage. A corrupt file is moved aside and a new one
started, this run's engine records and desired state written to it again. A database this run
could not read (a newer schema, no permission) is never given desired state: a run that did not
see what it holds does not overwrite it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from vllmd.events import Event, EventBus
from vllmd.overrides import Overrides
from vllmd.store import records, runs, schema
from vllmd.store.processes import EngineProcesses, Seen
from vllmd.store.records import Desired, EngineRecord, Row

log = structlog.get_logger("vllmd.store")

BOUND = 10_000  # events waiting to be written, beyond the bus's own queue of the same bound
BATCH = 2_000  # events per transaction
RESERVE = 50_000  # event ids reserved ahead in the file (more than can wait unwritten)
DEGRADED_HOLD = 300.0  # seconds a problem keeps the store reported degraded
STALLED = 5.0  # a write running longer than this is a stalled disk
PRUNE_EVERY = 3600.0
_BACKOFF = (0.5, 10.0)  # first and longest wait between retries of a failing write

Writer = Callable[..., None]  # records.write's signature: tests stall or fail it


class StateStore:
    def __init__(
        self,
        directory: Path,
        *,
        retention: Callable[[], float],  # seconds events are kept (the config's, now)
        clock: Callable[[], float] = time.time,  # unix seconds (retention; degraded hold)
        write: Writer = records.write,  # tests: a disk that stalls or fails
        max_pages: int | None = None,  # tests: a disk that is full at this many pages
    ) -> None:
        self.path = directory / schema.FILENAME
        self._retention = retention
        self._clock = clock
        self._write = write
        self._max_pages = max_pages
        self._writer: sqlite3.Connection | None = None  # used under _write_lock only
        self._reader: sqlite3.Connection | None = None  # used under _read_lock only
        self._reader_stale = True
        self._write_lock = anyio.CapacityLimiter(1)
        self._read_lock = anyio.CapacityLimiter(1)
        self._ids: Callable[[], int] = itertools.count(1).__next__
        self._floor = 0  # ids up to here are reserved in the file
        self._issued = 0  # the last id handed out
        self.engines: list[EngineRecord] = []  # as recorded by the previous run
        self.desired = Desired({}, frozenset())  # likewise
        self.overheads: dict[str, records.Overhead] = {}  # GPU overheads learned, likewise
        self.host_measured: dict[str, records.HostMeasured] = {}  # level-1 sleeps' host RAM
        self.read_ok = False  # whether the previous run's records could be read at all
        self.runs = runs.Runs()  # this run's id (listed when opened) and the earlier runs
        self._live: dict[str, EngineRecord] = {}  # this run's engines, as written
        self._processes = EngineProcesses()  # theirs beside the leader, as the daemon saw them
        self._rewrite = False  # a new file replaced a corrupt one: write everything again
        self._pending: list[Event] = []
        self._wake = anyio.Event()
        self._room = anyio.Event()
        self._desired_dirty = False
        self._overrides: Overrides | None = None
        self._bus: EventBus | None = None
        self._stream: MemoryObjectReceiveStream[Event] | None = None
        self._closed = False
        self._failing: str | None = None  # the error while writes fail
        self._write_since: float | None = None  # when the write in progress began
        self._problem_at = -math.inf
        self._dropped_seen = 0
        self._pruned_at = -math.inf

    # --- start ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, read what the previous run left (engine records, desired state,
        the ids) and prune old events. Never raises: a database that cannot be opened leaves
        the store degraded, retrying on each write; what it holds is still read if it can be."""
        try:
            await anyio.to_thread.run_sync(self._open, limiter=self._write_lock)
        except (OSError, sqlite3.Error) as exc:
            self._fail(f"cannot open {self.path}: {exc}")
            self._ids = itertools.count(records.clock_id()).__next__
            try:
                await anyio.to_thread.run_sync(self._read_only, limiter=self._read_lock)
            except (OSError, sqlite3.Error) as again:
                skipped = "crash recovery; restoring pins and loaded models"
                log.error(
                    "state_unreadable", path=str(self.path), error=str(again), skipped=skipped
                )

    def _open(self) -> None:
        self._writer, fresh = schema.connect(self.path, max_pages=self._max_pages)
        if fresh:  # the old file (and its ids) moved aside as corrupt
            self._problem_at = self._clock()
        first = records.reserve_ids(self._writer, RESERVE, records.clock_id() if fresh else 0)
        self._floor = first + RESERVE
        self._ids = itertools.count(first).__next__
        self.engines = records.engines(self._writer)
        self.desired = records.desired(self._writer)
        self.overheads = records.overheads(self._writer)
        self.host_measured = records.host_measured(self._writer)
        self.runs.begin(self._writer)  # before any engine of this run is spawned
        self.read_ok = True
        with contextlib.suppress(sqlite3.Error):  # tried again within the hour
            self._prune()

    def _read_only(self) -> None:
        conn = schema.reader(self.path)
        try:
            self.engines = records.engines(conn)
            self.desired = records.desired(conn)
            self.overheads = records.overheads(conn)
            self.host_measured = records.host_measured(conn)
            self.runs.read(conn)
            self.read_ok = True
        finally:
            conn.close()

    def next_id(self) -> int:
        """The next event id (the bus's counter)."""
        self._issued = self._ids()
        return self._issued

    def degraded(self) -> bool:
        now = self._clock()
        dropped = self._bus.dropped.get("store", 0) if self._bus is not None else 0
        if dropped > self._dropped_seen:
            self._dropped_seen = dropped
            self._problem_at = now
            log.error("state_store_lost_events", dropped=dropped)
        if self._write_since is not None and now - self._write_since > STALLED:
            self._problem_at = now
        return self._failing is not None or now - self._problem_at < DEGRADED_HOLD

    # --- writing -------------------------------------------------------------------------------

    async def run(
        self,
        bus: EventBus,
        overrides: Overrides,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe to `bus` and write what it tells, and `overrides` on every change, until
        cancelled; `drain` first writes what is left."""
        self._bus, self._overrides = bus, overrides
        overrides.watch(self._desired_changed)
        with bus.subscribe("store", bound=BOUND) as stream:
            self._stream = stream
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, stream)
                tg.start_soon(self._write_loop)
                task_status.started()

    def _desired_changed(self) -> None:
        self._desired_dirty = True
        self._wake.set()

    async def _pump(self, stream: MemoryObjectReceiveStream[Event]) -> None:
        async for event in stream:
            while len(self._pending) >= BOUND:  # the writer is stuck: let the bus's bound
                self._room = anyio.Event()  # overflow (counted) rather than grow without end
                await self._room.wait()
            self._pending.append(event)
            self._wake.set()

    async def _write_loop(self) -> None:
        backoff = _BACKOFF[0]
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._unwritten() and not self._closed:
                batch = self._pending[:BATCH]
                desired = self._desired() if self._desired_dirty else None
                self._desired_dirty = False
                seen = self._processes.take()
                try:
                    await self._in_writer(self._write_batch, batch, desired, seen)
                except (OSError, sqlite3.Error) as exc:
                    self._desired_dirty |= desired is not None or self._rewrite
                    self._processes.failed(seen)
                    self._fail(str(exc))
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF[1])
                    continue
                backoff = _BACKOFF[0]
                del self._pending[: len(batch)]
                self._room.set()
                if self._failing is not None:
                    log.info("state_store_recovered", after=self._failing)
                    self._failing = None

    def _unwritten(self) -> bool:
        return bool(self._pending or self._desired_dirty or self._processes.changed)

    async def _in_writer(self, work: Callable[..., None], *args: Any) -> None:
        """`work` on the writer thread; a daemon that stops does not wait for a hung disk."""
        self._write_since = self._clock()
        try:
            await anyio.to_thread.run_sync(
                work, *args, limiter=self._write_lock, abandon_on_cancel=True
            )
        finally:
            self._write_since = None

    def _desired(self) -> Desired | None:
        """The desired state to write; None when the previous run's could not be read."""
        if self._overrides is None or not self.read_ok:
            return None
        return Desired(self._overrides.runtime_pins(), self._overrides.on_purpose())

    def note_descendants(
        self, pid: int, start_time: float, processes: Mapping[int, float] | None
    ) -> None:
        """The engine whose leader is `pid` (started at `start_time`) has these other processes
        now (pid -> start time); None once it is gone. Written into its record."""
        self._processes.note((pid, start_time), processes)
        self._wake.set()

    def _write_batch(self, batch: Sequence[Event], desired: Desired | None, seen: Seen) -> None:
        """In the writer thread: one transaction. A corrupt file is moved aside (the batch is
        then retried on a new one, with this run's engines and desired state again)."""
        if self._closed:
            return
        if self._writer is None:
            self._writer, fresh = schema.connect(self.path, max_pages=self._max_pages)
            self._reader_stale = True
            self._rewrite |= fresh
        rows = [Row(e.id, e.time, str(e.kind), e.model, e.fields) for e in batch]
        engines = records.engine_changes(batch)
        if self._rewrite:
            engines = {**self._live, **engines}
        engines = seen.apply(engines, self._live)
        top = rows[-1].id if rows else 0
        floor = top + RESERVE if top > self._floor - RESERVE // 2 else None
        try:
            self._write(self._writer, rows, engines, desired, floor)
        except sqlite3.DatabaseError as exc:
            if schema.is_corruption(exc):
                self._writer.close()
                self._writer = None
                self._rewrite = True
                aside = schema.move_aside(self.path)
                log.error("state_db_corrupt", path=str(self.path), moved_to=str(aside))
            raise
        if self._rewrite:
            self.runs.keep(self._writer)
        self._rewrite = False
        self._floor = floor or self._floor
        for model, record in engines.items():
            if record is None:
                self._live.pop(model, None)
            else:
                self._live[model] = record
        if self._clock() - self._pruned_at > PRUNE_EVERY:
            try:
                self._prune()
            except sqlite3.Error as exc:  # the batch is written: only the pruning waits
                log.warning("state_prune_failed", error=str(exc))

    def _prune(self) -> None:
        assert self._writer is not None
        self._pruned_at = self._clock()
        gone = records.prune(self._writer, self._clock() - self._retention())
        if gone:
            log.info("state_events_pruned", events=gone)

    def _fail(self, error: str) -> None:
        if self._failing is None:
            log.error("state_store_degraded", path=str(self.path), error=error)
        self._failing = error
        self._problem_at = self._clock()

    async def drain(self, timeout: float = 5.0) -> None:
        """At shutdown: let the writer catch up with what is queued, then close the database;
        at most `timeout` seconds in all (a hung disk is left behind, reported)."""
        with anyio.move_on_after(timeout, shield=True):
            for _ in range(3):  # events handed to the pump but not yet taken by it
                await anyio.lowlevel.checkpoint()
            while self._pending or self._desired_dirty or self._queued():
                self._wake.set()
                await anyio.sleep(0.01)
            async with self._write_lock, self._read_lock:  # after the write in progress
                self._closed = True
                clean = not (self._pending or self._queued() or self._failing)
                await anyio.to_thread.run_sync(self._close, clean, abandon_on_cancel=True)
        left = len(self._pending) + self._queued()
        if left or self._desired_dirty:
            log.error("state_store_unsaved", events=left, desired_state=self._desired_dirty)
        self._closed = True

    def _close(self, clean: bool) -> None:
        if clean and self._writer is not None:  # every id handed out is written: the next
            with contextlib.suppress(sqlite3.Error):  # run goes on right after the last one
                records.write(self._writer, [], {}, None, self._issued)
                self.runs.end(self._writer)  # its engines are all gone or recorded
        for conn in (self._writer, self._reader):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._writer = self._reader = None

    def _queued(self) -> int:  # events in the bus's queue, not yet pumped
        return self._stream.statistics().current_buffer_used if self._stream is not None else 0

    async def forget_engines(self, models: Iterable[str]) -> None:
        """Crash recovery is done with these records."""
        names = list(models)
        if names and self.read_ok:
            try:
                await self._in_writer(self._forget, names)
            except (OSError, sqlite3.Error) as exc:
                self._fail(str(exc))

    def _forget(self, models: list[str]) -> None:
        if self._writer is not None and not self._closed:
            records.forget_engines(self._writer, models)

    # --- reading -------------------------------------------------------------------------------

    async def events(
        self,
        *,
        after_id: int | None = None,
        from_time: float | None = None,
        limit: int,
        newest: bool,
    ) -> list[dict[str, Any]]:
        """Events after an id or from a time on, oldest first (the oldest or the newest
        `limit`): from the database, with what is not written yet from the bus's history."""
        found: dict[int, dict[str, Any]] = {}
        read = partial(
            self._read, after_id=after_id, from_time=from_time, limit=limit, newest=newest
        )
        try:
            rows = await anyio.to_thread.run_sync(read, limiter=self._read_lock)
            found = {r.id: r.as_dict() for r in rows}
        except (OSError, sqlite3.Error) as exc:
            log.warning("state_store_read_failed", error=str(exc))
        for event in self._bus.history if self._bus is not None else ():
            if (after_id is None or event.id > after_id) and (
                from_time is None or event.time >= from_time
            ):
                found.setdefault(event.id, event.as_dict())
        ordered = [found[i] for i in sorted(found)]
        return ordered[-limit:] if newest else ordered[:limit]

    def _read(self, **query: Any) -> list[Row]:
        """On the reader thread: a reader opened again after the writer reconnected (the file
        may be a new one) or a failure."""
        if self._closed:
            return []
        if self._reader is None or self._reader_stale:
            if self._reader is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._reader.close()
                self._reader = None
            self._reader = schema.reader(self.path)
            self._reader_stale = False
        try:
            return records.events(self._reader, **query)
        except sqlite3.Error:
            self._reader_stale = True
            raise
