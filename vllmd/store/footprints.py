"""What each model's engine was last measured to hold, and the overheads its starts learned,
read from the state store with the daemon down (`vllmd check-config --plan`)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from vllmd.store.records import Overhead, overheads
from vllmd.store.schema import FILENAME, reader


@dataclass(frozen=True, slots=True)
class Recorded:
    footprints: dict[str, int] = field(default_factory=dict)  # per device, per model
    overheads: dict[str, Overhead] = field(default_factory=dict)


def recorded_footprints(state_dir: Path) -> Recorded:
    """Each model's footprint per device as its last `measured` event says, and its learned
    overhead; empty when the store is absent or cannot be read (a plan still shows the
    estimates)."""
    try:
        conn = reader(state_dir / FILENAME)
    except (OSError, sqlite3.Error):
        return Recorded()
    with contextlib.closing(conn):
        try:
            rows = conn.execute(
                "SELECT model, fields FROM events WHERE id IN (SELECT MAX(id) FROM events "
                "WHERE kind = 'measured' GROUP BY model)"
            ).fetchall()
            learned = overheads(conn)
        except (sqlite3.Error, ValueError):
            return Recorded()
    found: dict[str, int] = {}
    for model, fields in rows:
        try:
            used = json.loads(fields).get("used_bytes")
        except (ValueError, AttributeError):
            continue
        if isinstance(used, int) and used > 0:
            found[model] = used
    return Recorded(found, learned)
