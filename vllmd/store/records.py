"""The state database itself (SQLite, WAL): its schema and migrations, the records it keeps, and
the statements vllmd runs on it. Synchronous: only the state store (db.py) calls it, from worker
threads, one connection per role (a writer; a reader, which WAL lets run beside the writer).

A file that is not a database, or fails its quick check, is moved aside (`vllmd.db.corrupt-
<unix time>`, with its -wal and -shm) and a new one is started: the event log is lost, the
daemon is not.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from vllmd.events import Event, Kind

log = structlog.get_logger("vllmd.store")

FILENAME = "vllmd.db"
BUSY_TIMEOUT_MS = 2000  # a locked database is waited for this long, then the write fails

# Each entry migrates from the schema version of its index to the next (PRAGMA user_version).
# Never edit one that has shipped: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        model TEXT,
        fields TEXT NOT NULL
    );
    CREATE INDEX events_time ON events (time);
    CREATE TABLE engines (
        model TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        pgid INTEGER NOT NULL,
        start_time REAL NOT NULL,
        boot_id TEXT NOT NULL,
        address TEXT NOT NULL,
        marker TEXT NOT NULL,
        spawned_at REAL NOT NULL
    );
    CREATE TABLE pins (model TEXT PRIMARY KEY, config_pinned INTEGER NOT NULL);
    CREATE TABLE loaded_on_purpose (model TEXT PRIMARY KEY);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # The newest `measured` event per model is read at every start (learned GPU overheads;
    # likewise `sleep_measured`: host RAM at a level-1 sleep).
    """
    CREATE INDEX events_kind_model ON events (kind, model, id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
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


def connect(path: Path, *, max_pages: int | None = None) -> tuple[sqlite3.Connection, bool]:
    """Open (creating and migrating) the database at `path`; True with it when a corrupt file
    was moved aside to make a new one. OSError / sqlite3.Error for a directory that cannot be
    used or a database that is locked or full."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _open(path, max_pages), False
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise  # locked, read-only, full: not the file's fault
        aside = move_aside(path)
        log.error("state_db_corrupt", path=str(path), moved_to=str(aside), error=str(exc))
        return _open(path, max_pages), True


def _open(path: Path, max_pages: int | None) -> sqlite3.Connection:
    conn = _connect(str(path))

    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable up to the last checkpoint
        if max_pages is not None:  # tests: a "full disk" at a chosen size
            conn.execute(f"PRAGMA max_page_count = {int(max_pages)}")
        check = conn.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(target: str, *, uri: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(
        target,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,  # autocommit: transactions are begun by hand
        check_same_thread=False,  # used from worker threads, one at a time (the store's locks)
        uri=uri,
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def reader(path: Path) -> sqlite3.Connection:
    """A read-only connection (no check, no migration: the writer did them); OSError or
    sqlite3.Error when there is no usable database."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return _connect(f"file:{path}?mode=ro", uri=True)


def _migrate(conn: sqlite3.Connection) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise sqlite3.OperationalError(
            f"the state database has schema version {version}, newer than this vllmd's "
            f"{SCHEMA_VERSION}: it was written by a newer vllmd"
        )
    for number in range(version, SCHEMA_VERSION):
        with transaction(conn):
            conn.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[number]}")
            conn.execute(f"PRAGMA user_version = {number + 1}")


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether an error raised while using the database means the file is broken (rather
    than locked, read-only or full)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "quick_check" in text


def move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
    return aside


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (autocommit connection: BEGIN/COMMIT by hand)."""
    if not conn.in_transaction:
        conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if conn.in_transaction:
        conn.execute("COMMIT")


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
            conn.execute("DELETE FROM engines WHERE model = ?", (model,))
            if e is not None:
                conn.execute(
                    "INSERT INTO engines VALUES (?,?,?,?,?,?,?,?)",
                    (model, e.pid, e.pgid, e.start_time, e.boot_id, e.address, e.marker, now),
                )
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
        "SELECT model, pid, pgid, start_time, boot_id, address, marker FROM engines"
    )
    return [EngineRecord(*row) for row in rows]


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
