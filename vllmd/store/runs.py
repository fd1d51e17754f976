"""The runs of a state dir (docs/design.md "Supervision"): each start of the daemon is a run with
an id of its own, written to the state database (`meta` key "runs": the last KEEP runs with
their boot id, and "ended" once one stopped cleanly) when the store opens, before any engine
is spawned. Every engine's marker
(MARKER_ENV, inherited by its whole tree) names the run that spawned it: `<run>.<model>.<token>`.

After a crash, recovery kills every process of this boot whose marker names an earlier run of
this state dir, whatever the store recorded of it: an engine whose `spawned` event was never
written, a child that left the engine's group before the daemon first noted it. Never the
current run's, and never another state dir's (its runs are not listed here): a second vllmd on
the host is never touched. A database that could not be read lists no runs.

Synchronous: the state store calls it from its worker threads.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
from dataclasses import dataclass

from vllmd.engine.process import boot_id
from vllmd.store.schema import transaction

KEEP = 32  # runs listed: an engine outliving that many restarts has survived SIGKILL anyway
RUN_BYTES = 4
TOKEN_BYTES = 6  # the part of a marker that tells one engine of a run from another
_KEY = "runs"


def new_run() -> str:
    """A fresh run id: hex, so a marker's first '.' ends it (model names may hold '.')."""
    return secrets.token_hex(RUN_BYTES)


def engine_marker(run: str, model: str) -> str:
    """The marker of one engine of `run` (MARKER_ENV's value): unique to that engine."""
    return f"{run}.{model}.{secrets.token_hex(TOKEN_BYTES)}"


def run_of(marker: str) -> str | None:
    """The run an engine's marker names; None for a marker of another form (an older vllmd's)."""
    run, dot, rest = marker.partition(".")
    if not dot or "." not in rest or len(run) != 2 * RUN_BYTES:
        return None
    return run if all(c in string.hexdigits for c in run) else None


def model_of(marker: str) -> str:
    """The model an engine's marker names ("" for a marker of another form)."""
    if run_of(marker) is None:
        return ""
    return marker.partition(".")[2].rpartition(".")[0]


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    boot_id: str
    ended: bool = False  # stopped cleanly: every engine gone, or recorded (nothing to scan for)


class Runs:
    """This run's id, and the earlier runs of the state dir as the database listed them."""

    def __init__(self, current: str | None = None, boot: str | None = None) -> None:
        self.current = current or new_run()
        self._boot = boot  # None: this boot's id, read when begun
        self.earlier: tuple[Run, ...] = ()

    def begin(self, conn: sqlite3.Connection) -> None:
        """Read the earlier runs and list this one after them, committed on return."""
        with transaction(conn):
            self.earlier = tuple(r for r in listed(conn) if r.id != self.current)
            self._put(conn)

    def read(self, conn: sqlite3.Connection) -> None:
        """Read the earlier runs only (a database this run cannot write)."""
        self.earlier = tuple(r for r in listed(conn) if r.id != self.current)

    def keep(self, conn: sqlite3.Connection) -> None:
        """List this run and the earlier ones again (a new file replaced a corrupt one)."""
        with transaction(conn):
            self._put(conn)

    def on_this_boot(self) -> frozenset[str]:
        """The earlier runs of this boot that did not end cleanly: those whose engines may
        still be alive unrecorded (so a clean restart reads no process's environment)."""
        boot = boot_id()
        return frozenset(r.id for r in self.earlier if r.boot_id == boot and not r.ended)

    def end(self, conn: sqlite3.Connection) -> None:
        """This run stops cleanly: every event written, its engines stopped (or recorded)."""
        with transaction(conn):
            self._put(conn, ended=True)

    def _put(self, conn: sqlite3.Connection, *, ended: bool = False) -> None:
        now = Run(self.current, self._boot or boot_id(), ended)
        runs = [*self.earlier, now][-KEEP:]
        value = json.dumps([[r.id, r.boot_id, *(["ended"] if r.ended else [])] for r in runs])
        conn.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_KEY, value),
        )


def listed(conn: sqlite3.Connection) -> list[Run]:
    """The runs the database lists, oldest first (none where the value is not a list of
    [run, boot id] pairs: a run not listed is only not matched)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_KEY,)).fetchone()
    try:
        pairs = json.loads(row[0]) if row else []
    except ValueError:
        return []
    if not isinstance(pairs, list):
        return []
    return [
        Run(p[0], p[1], p[2:] == ["ended"])
        for p in pairs
        if isinstance(p, list) and len(p) in (2, 3) and all(isinstance(x, str) for x in p)
    ]
