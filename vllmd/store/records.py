"""The records the state database keeps and the statements vllmd runs on it (schema.py: the
file, its schema and migrations). Synchronous: only the state store (db.py) calls it, from
worker threads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllmd.events import Event, Kind
from vllmd.store.schema import transaction

_NO_ENGINE = frozenset({"stopped", "backoff", "failed"})  # states with no engine process


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """An engine vllmd spawned and has not seen stop (what crash recovery looks for)."""

    model: str
    pid: int
    pgid: int
    start_time: float
    boot_id: str
    address: str = ""
    marker: str = ""  # the engine's MARKER_ENV value, inherited by its processes
    # (pid, start time) of the engine's other processes as the daemon last saw them, its
    # group's or not: one that left the group is found by these alone.
    descendants: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Desired:
    """What operators asked for that outlives the daemon: runtime pins (with the config's
    `pinned` value when they were set: a pin holds until that key changes) and the models
    loaded on purpose."""

    pins: Mapping[str, bool]
    loaded_on_purpose: frozenset[str]


@dataclass(frozen=True, slots=True)
class Row:
    """One event as the store keeps it."""

    id: int
    time: float
    kind: str
    model: str | None
    fields: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "kind": self.kind,
            "model": self.model,
            **self.fields,
        }


# A new engine's record replaces the model's last; the same engine's (its processes seen again)
# keeps when it was spawned.
_PUT_ENGINE = """
INSERT INTO engines (model, pid, pgid, start_time, boot_id, address, marker, spawned_at,
    descendants) VALUES (?,?,?,?,?,?,?,?,?)
ON CONFLICT (model) DO UPDATE SET
    spawned_at = CASE WHEN pid = excluded.pid AND start_time = excluded.start_time
        THEN spawned_at ELSE excluded.spawned_at END,
    pid = excluded.pid, pgid = excluded.pgid, start_time = excluded.start_time,
    boot_id = excluded.boot_id, address = excluded.address, marker = excluded.marker,
    descendants = excluded.descendants
"""


# --- writes (the store's writer thread) ---------------------------------------------------------


def write(
    conn: sqlite3.Connection,
    rows: Sequence[Row],
    engines: Mapping[str, EngineRecord | None],
    desired: Desired | None,
    id_floor: int | None = None,
) -> None:
    """One batch in one transaction: events, engine records (a model's new engine, or None:
    its engine is gone), the desired state when it changed, the id floor when it moved. All
    or nothing; a batch written again (after a failure past its commit) changes nothing."""
    with transaction(conn):
        conn.executemany(
            "INSERT OR IGNORE INTO events (id, time, kind, model, fields) VALUES (?,?,?,?,?)",
            [(r.id, r.time, r.kind, r.model, json.dumps(r.fields, default=str)) for r in rows],
        )
        now = time.time()
        for model, e in engines.items():
            if e is None:
                conn.execute("DELETE FROM engines WHERE model = ?", (model,))
                continue
            processes = json.dumps({str(pid): created for pid, created in e.descendants})
            engine = (model, e.pid, e.pgid, e.start_time, e.boot_id, e.address, e.marker, now)
            conn.execute(_PUT_ENGINE, (*engine, processes))
        if desired is not None:
            conn.execute("DELETE FROM pins")
            conn.executemany(
                "INSERT INTO pins VALUES (?, ?)", [(m, int(c)) for m, c in desired.pins.items()]
            )
            conn.execute("DELETE FROM loaded_on_purpose")
            conn.executemany(
                "INSERT INTO loaded_on_purpose VALUES (?)",
                [(m,) for m in sorted(desired.loaded_on_purpose)],
            )
        if id_floor is not None:
            _set_floor(conn, id_floor)


def _set_floor(conn: sqlite3.Connection, floor: int) -> None:
    conn.execute(
        "INSERT INTO meta VALUES ('id_floor', ?) ON CONFLICT (key) DO UPDATE SET value = ?",
        (str(floor), str(floor)),
    )


def clock_id() -> int:
    """Where ids go on when the stored ones are lost: unix milliseconds (above any stored)."""
    return int(time.time() * 1000)


def reserve_ids(conn: sqlite3.Connection, ahead: int, at_least: int = 0) -> int:
    """The first event id this run may use: past every id stored and every id a previous run
    may have handed out unwritten (its floor), and at least `at_least`. Ids up to `ahead`
    beyond it are reserved now, before any is handed out."""
    (floor,) = conn.execute("SELECT value FROM meta WHERE key = 'id_floor'").fetchone() or ("0",)
    first = max(last_id(conn), int(floor), at_least - 1) + 1
    with transaction(conn):
        _set_floor(conn, first + ahead)
    return first


def prune(conn: sqlite3.Connection, before: float) -> int:
    """Drop events older than `before` (unix s), the newest one kept (it holds the id)."""
    with transaction(conn):
        cursor = conn.execute(
            "DELETE FROM events WHERE time < ? AND id < (SELECT MAX(id) FROM events)", (before,)
        )
    return cursor.rowcount


def forget_engines(conn: sqlite3.Connection, models: Iterable[str]) -> None:
    with transaction(conn):
        conn.executemany("DELETE FROM engines WHERE model = ?", [(m,) for m in models])


# --- reads --------------------------------------------------------------------------------------


def last_id(conn: sqlite3.Connection) -> int:
    (found,) = conn.execute("SELECT MAX(id) FROM events").fetchone()
    return int(found or 0)


def engines(conn: sqlite3.Connection) -> list[EngineRecord]:
    rows = conn.execute(
        "SELECT model, pid, pgid, start_time, boot_id, address, marker, descendants FROM engines"
    )
    return [
        EngineRecord(model, pid, pgid, start, boot, address, marker, _processes(processes))
        for model, pid, pgid, start, boot, address, marker, processes in rows
    ]


def _processes(text: str) -> tuple[tuple[int, float], ...]:
    """An engine record's processes as written (pid -> start time); none from a damaged one."""
    try:
        found = json.loads(text)
        return tuple(sorted((int(pid), float(created)) for pid, created in found.items()))
    except (ValueError, TypeError, AttributeError):
        return ()


def desired(conn: sqlite3.Connection) -> Desired:
    pins = {m: bool(c) for m, c in conn.execute("SELECT model, config_pinned FROM pins")}
    loaded = frozenset(m for (m,) in conn.execute("SELECT model FROM loaded_on_purpose"))
    return Desired(pins, loaded)


@dataclass(frozen=True, slots=True)
class Overhead:
    """What a model's engine allocated per GPU beyond its fraction at a cold start, on how
    many GPUs of which type (NVML's name; None: unknown, or learned before it was kept)."""

    nbytes: int
    gpus: int
    device_type: str | None = None

    def fits(self, gpus: int, device_type: str | None) -> bool:
        """Whether it holds for a start on `gpus` GPUs of `device_type`."""
        same_type = self.device_type is None or device_type is None
        return self.gpus == gpus and (same_type or self.device_type == device_type)


def overheads(conn: sqlite3.Connection) -> dict[str, Overhead]:
    """Each model's GPU overhead as its last cold start measured it (event `measured` with
    `overhead_bytes`)."""
    rows = conn.execute(
        "SELECT model, fields FROM events WHERE id IN (SELECT MAX(id) FROM events "
        "WHERE kind = 'measured' AND fields LIKE '%overhead_bytes%' GROUP BY model)"
    )
    found = {}
    for model, fields in rows:
        data = json.loads(fields)
        nbytes, gpus = data.get("overhead_bytes"), data.get("gpus", 1)
        kind = data.get("device_type")
        if isinstance(nbytes, int) and nbytes >= 0 and isinstance(gpus, int):
            found[model] = Overhead(nbytes, gpus, kind if isinstance(kind, str) else None)
    return found


@dataclass(frozen=True, slots=True)
class HostMeasured:
    """A level-1 sleep's host RAM and its weights' fingerprint (None: from an older vllmd)."""

    nbytes: int
    fingerprint: str | None = None


def host_measured(conn: sqlite3.Connection) -> dict[str, HostMeasured]:
    """Each model's last level-1 sleep measured (event `sleep_measured`)."""
    rows = conn.execute(
        "SELECT model, fields FROM events WHERE id IN (SELECT MAX(id) FROM events "
        "WHERE kind = 'sleep_measured' GROUP BY model)"
    )
    found = {}
    for model, fields in rows:
        data = json.loads(fields)
        nbytes, key = data.get("host_bytes"), data.get("fingerprint")
        if isinstance(nbytes, int) and nbytes > 0:
            found[model] = HostMeasured(nbytes, key if isinstance(key, str) else None)
    return found


def events(
    conn: sqlite3.Connection,
    *,
    after_id: int | None = None,
    from_time: float | None = None,
    limit: int,
    newest: bool,
) -> list[Row]:
    """Events after an id or from a time on, oldest first: the oldest `limit` of them, or the
    newest `limit` when `newest`."""
    where, args = "1", list[float]()
    if after_id is not None:
        where, args = "id > ?", [after_id]
    elif from_time is not None:
        where, args = "time >= ?", [from_time]
    order = "DESC" if newest else "ASC"
    rows = conn.execute(
        f"SELECT id, time, kind, model, fields FROM events WHERE {where} "
        f"ORDER BY id {order} LIMIT ?",
        [*args, limit],
    ).fetchall()
    found = [Row(i, t, k, m, json.loads(f)) for i, t, k, m, f in rows]
    return found[::-1] if newest else found


def engine_changes(batch: Sequence[Event]) -> dict[str, EngineRecord | None]:
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
                str(f.get("marker", "")),
            )
        elif (e.kind is Kind.STATE and f.get("new") in _NO_ENGINE) or e.kind is Kind.MODEL_REMOVED:
            out[e.model] = None
    return out
