"""What each model's engine was last measured to hold, read from the state store with the
daemon down (`vllmd check-config --plan`)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from vllmd.store.records import FILENAME, reader


def recorded_footprints(state_dir: Path) -> dict[str, int]:
    """Each model's footprint per device as its last `measured` event says; {} when the store
    is absent or cannot be read (a plan still shows the estimates)."""
    try:
        conn = reader(state_dir / FILENAME)
    except (OSError, sqlite3.Error):
        return {}
    found: dict[str, int] = {}
    with contextlib.closing(conn):
        try:
            rows = conn.execute(
                "SELECT model, fields FROM events WHERE id IN (SELECT MAX(id) FROM events "
                "WHERE kind = 'measured' GROUP BY model)"
            ).fetchall()
        except sqlite3.Error:
            return {}
    for model, fields in rows:
        try:
            used = json.loads(fields).get("used_bytes")
        except (ValueError, AttributeError):
            continue
        if isinstance(used, int) and used > 0:
            found[model] = used
    return found
