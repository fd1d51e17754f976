"""What outlives the daemon: the state store (SQLite) and the crash recovery that reads it."""

from vllmd.store.db import StateStore
from vllmd.store.footprints import recorded_footprints
from vllmd.store.records import Desired, EngineRecord
from vllmd.store.recovery import recover

__all__ = ["Desired", "EngineRecord", "StateStore", "recorded_footprints", "recover"]
