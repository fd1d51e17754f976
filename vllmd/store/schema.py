"""The state database's file (SQLite, WAL): its schema and migrations, how it is opened, and what
is done with a file that is no database. Synchronous: called from the state store's worker
threads, one connection per role (a writer; a reader, which WAL lets run beside the writer).

A file that is not a database, or fails its quick check, is moved aside (`vllmd.db.corrupt-
<unix time>`, with its -wal and -shm) and a new one is started: the event log is lost, the
daemon is not.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

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
    # An engine's processes as the daemon saw them (JSON: pid -> start time), its group's or
    # not: crash recovery kills those that left the group too.
    """
    ALTER TABLE engines ADD COLUMN descendants TEXT NOT NULL DEFAULT '{}';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


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
