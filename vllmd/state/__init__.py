"""What outlives the daemon: the state store (SQLite) and the crash recovery that reads it."""

from vllmd.state.db import Desired, EngineRecord
from vllmd.state.recovery import recover
from vllmd.state.store import StateStore

__all__ = ["Desired", "EngineRecord", "StateStore", "recover"]
