"""The state store: vllmd's memory across restarts, in `state_dir/vllmd.db` (see db.py).

It is a queued subscriber of the event bus (DESIGN "State store"): events reach it through the
bus's bounded queue and are written in batches from a worker thread, so a slow or stalled disk
never slows a request or a transition; what it cannot keep up with overflows the bound and is
counted in `vllmd_events_dropped_total{subscriber="store"}`. From the events it keeps the
engine records crash recovery needs (a `spawned` event adds one, a stop removes it), and from
the `Overrides` the desired state (runtime pins, models loaded on purpose).

It owns event ids: the bus numbers events with `next_id`, which continues from the highest id
stored. Where the old file could not be read (moved aside as corrupt, or the database cannot be
opened), ids continue from the clock in milliseconds, so they still never go back.

A locked, corrupt or full database degrades the store, never the daemon: the batch is kept and
retried with backoff (events queue behind it, up to the bound), `degraded()` answers True (the
`vllmd_state_store_degraded` gauge and the `state_store_degraded` alert read it) while writes
fail and for DEGRADED_HOLD after the last problem (a write failure or a lost event), so a short
outage is still seen by a scrape; a corrupt file is moved aside and a new one started.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from vllmd.events import Event, EventBus, Kind
from vllmd.overrides import Overrides
from vllmd.state import db
from vllmd.state.db import Desired, EngineRecord, Row

log = structlog.get_logger("vllmd.state")

BOUND = 10_000  # events waiting to be written, beyond the bus's own queue of the same bound
BATCH = 2_000  # events per transaction
DEGRADED_HOLD = 300.0  # seconds a problem keeps the store reported degraded
PRUNE_EVERY = 3600.0
_BACKOFF = (0.5, 10.0)  # first and longest wait between retries of a failing write
_NO_ENGINE = frozenset({"stopped", "backoff", "failed"})  # states with no engine process

Writer = Callable[
    [sqlite3.Connection, Sequence[Row], Mapping[str, EngineRecord | None], Desired | None], None
]


class StateStore:
    def __init__(
        self,
        directory: Path,
        *,
        retention: Callable[[], float],  # seconds events are kept (the config's, now)
        clock: Callable[[], float] = time.time,  # unix seconds (retention; degraded hold)
        write: Writer = db.write,  # tests: a disk that stalls or fails
        max_pages: int | None = None,  # tests: a disk that is full at this many pages
    ) -> None:
        self.path = directory / db.FILENAME
        self._retention = retention
        self._clock = clock
        self._write = write
        self._max_pages = max_pages
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lock = anyio.CapacityLimiter(1)  # one writer thread at a time
        self._read_lock = anyio.CapacityLimiter(1)
        self._ids: Callable[[], int] = itertools.count(1).__next__
        self.engines: list[EngineRecord] = []  # as recorded by the previous run
        self.desired = Desired({}, frozenset())  # likewise
        self._pending: list[Event] = []
        self._wake = anyio.Event()
        self._room = anyio.Event()
        self._desired_dirty = False
        self._overrides: Overrides | None = None
        self._bus: EventBus | None = None
        self._failing: str | None = None  # the error while writes fail
        self._problem_at = -math.inf
        self._dropped_seen = 0
        self._stream: MemoryObjectReceiveStream[Event] | None = None
        self._closed = False
        self._pruned_at = -math.inf

    # --- start ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, read what the previous run left (engine records, desired state,
        the last event id) and prune old events. Never raises: a database that cannot be used
        leaves the store degraded, retrying on each write."""
        try:
            await anyio.to_thread.run_sync(self._open, limiter=self._write_lock)
        except (OSError, sqlite3.Error) as exc:
            self._fail(f"cannot open {self.path}: {exc}")
            self._ids = itertools.count(_clock_id()).__next__

    def _open(self) -> None:
        self._writer, fresh = db.connect(self.path, max_pages=self._max_pages)
        self._reader, _ = db.connect(self.path)
        last = db.last_id(self._writer)
        if fresh:  # the old file (and its ids) moved aside as corrupt
            self._problem_at = self._clock()
            last = max(last, _clock_id())
        self._ids = itertools.count(last + 1).__next__
        self.engines = db.engines(self._writer)
        self.desired = db.desired(self._writer)
        self._prune()

    def next_id(self) -> int:
        """The next event id (the bus's counter)."""
        return self._ids()

    def degraded(self) -> bool:
        dropped = self._bus.dropped.get("store", 0) if self._bus is not None else 0
        if dropped > self._dropped_seen:
            self._dropped_seen = dropped
            self._problem_at = self._clock()
            log.error("state_store_lost_events", dropped=dropped)
        return self._failing is not None or self._clock() - self._problem_at < DEGRADED_HOLD

    # --- writing -------------------------------------------------------------------------------

    async def run(
        self,
        bus: EventBus,
        overrides: Overrides,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe to `bus` and write what it tells, and `overrides` on every change, until
        cancelled; `drain` then writes what is left."""
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
            while self._pending or self._desired_dirty:
                batch = self._pending[:BATCH]
                desired = self._desired() if self._desired_dirty else None
                self._desired_dirty = False
                try:
                    await anyio.to_thread.run_sync(
                        self._write_batch, batch, desired, limiter=self._write_lock
                    )
                except (OSError, sqlite3.Error) as exc:
                    self._desired_dirty |= desired is not None
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

    def _desired(self) -> Desired:
        assert self._overrides is not None
        return Desired(self._overrides.runtime_pins(), self._overrides.on_purpose())

    def _write_batch(self, batch: Sequence[Event], desired: Desired | None) -> None:
        """In the writer thread: one transaction; a corrupt file is moved aside (the batch is
        then retried on a new one), a missing connection is opened again."""
        if self._closed:
            return  # shut down: what is left is reported by drain
        if self._writer is None:
            self._writer, _ = db.connect(self.path, max_pages=self._max_pages)
        rows = [Row(e.id, e.time, str(e.kind), e.model, e.fields) for e in batch]
        try:
            self._write(self._writer, rows, _engines(batch), desired)
        except sqlite3.DatabaseError as exc:
            if db.is_corruption(exc):
                self._writer.close()
                self._writer = None
                aside = db.move_aside(self.path)
                log.error("state_db_corrupt", path=str(self.path), moved_to=str(aside))
            raise
        if self._clock() - self._pruned_at > PRUNE_EVERY:
            self._prune()

    def _prune(self) -> None:
        assert self._writer is not None
        self._pruned_at = self._clock()
        gone = db.prune(self._writer, self._clock() - self._retention())
        if gone:
            log.info("state_events_pruned", events=gone)

    def _fail(self, error: str) -> None:
        if self._failing is None:
            log.error("state_store_degraded", path=str(self.path), error=error)
        self._failing = error
        self._problem_at = self._clock()

    async def drain(self, timeout: float = 5.0) -> None:
        """At shutdown: let the writer catch up with what is queued (bounded by `timeout`),
        then close the database."""
        with anyio.move_on_after(timeout, shield=True):
            while self._pending or self._desired_dirty or self._queued():
                self._wake.set()
                await anyio.sleep(0.01)
        if self._pending or self._queued():
            log.error("state_store_unsaved", events=len(self._pending) + self._queued())
        async with self._write_lock:  # after the write in progress
            self._closed = True
            for conn in (self._writer, self._reader):
                if conn is not None:
                    conn.close()
            self._writer = self._reader = None

    def _queued(self) -> int:
        return self._stream.statistics().current_buffer_used if self._stream is not None else 0

    async def forget_engines(self, models: Iterable[str]) -> None:
        """Crash recovery is done with these records."""
        if self._writer is None:
            return
        names = list(models)
        try:
            await anyio.to_thread.run_sync(
                db.forget_engines, self._writer, names, limiter=self._write_lock
            )
        except (OSError, sqlite3.Error) as exc:
            self._fail(str(exc))

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
        if self._reader is not None:
            try:
                read = partial(
                    db.events,
                    self._reader,
                    after_id=after_id,
                    from_time=from_time,
                    limit=limit,
                    newest=newest,
                )
                rows = await anyio.to_thread.run_sync(read, limiter=self._read_lock)
                found = {r.id: r.as_dict() for r in rows}
            except sqlite3.Error as exc:
                log.warning("state_store_read_failed", error=str(exc))
        for event in self._bus.history if self._bus is not None else ():
            if (after_id is None or event.id > after_id) and (
                from_time is None or event.time >= from_time
            ):
                found.setdefault(event.id, event.as_dict())
        ordered = [found[i] for i in sorted(found)]
        return ordered[-limit:] if newest else ordered[:limit]


def _clock_id() -> int:
    """Where ids go on when the stored ones are lost: unix milliseconds (above every id a
    store numbering from 1 could reach)."""
    return int(time.time() * 1000)


def _engines(batch: Sequence[Event]) -> dict[str, EngineRecord | None]:
    """Each model's engine after the batch: the one it spawned, or None once it is gone."""
    out: dict[str, EngineRecord | None] = {}
    for e in batch:
        if e.model is None:
            continue
        f = e.fields
        if e.kind is Kind.SPAWNED:
            out[e.model] = EngineRecord(
                e.model,
                int(f["pid"]),
                int(f["pgid"]),
                float(f["start_time"]),
                str(f.get("boot_id", "")),
                str(f.get("address", "")),
            )
        elif (e.kind is Kind.STATE and f.get("new") in _NO_ENGINE) or e.kind is Kind.MODEL_REMOVED:
            out[e.model] = None
    return out
