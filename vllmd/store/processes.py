"""An engine's processes beside its leader, as the daemon sees them while it runs, on their way
into the engine's record (docs/design.md "Supervision": crash recovery kills them by pid and
start time, so a process that left the engine's group is not left behind).

The daemon tells them on the event loop (`note`, each time they change); the writer takes a
snapshot of them before each write (`take`) and puts them into the records it writes (`apply`,
in the writer thread). They come keyed by the engine's leader (pid, start time), as the process
knows itself: the record they go into may be written before or after they come.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from vllmd.store.records import EngineRecord

Leader = tuple[int, float]  # an engine's leader: pid, start time (unix s)
Processes = tuple[tuple[int, float], ...]  # (pid, start time), sorted


@dataclass(frozen=True, slots=True)
class Seen:
    """A snapshot: every running engine's processes, and which changed since the last write."""

    known: Mapping[Leader, Processes]
    changed: frozenset[Leader]

    def apply(
        self, engines: Mapping[str, EngineRecord | None], live: Mapping[str, EngineRecord]
    ) -> dict[str, EngineRecord | None]:
        """The records to write: `engines` (a batch's changes) with their processes, and the
        written records (`live`) whose processes changed."""
        out: dict[str, EngineRecord | None] = {}
        for model, record in engines.items():
            processes = self.known.get(_leader(record)) if record is not None else None
            if record is not None and processes is not None:
                record = replace(record, descendants=processes)
            out[model] = record
        for model, record in live.items():
            leader = _leader(record)
            if model not in engines and leader in self.changed:
                out[model] = replace(record, descendants=self.known[leader])
        return out


class EngineProcesses:
    """What the daemon told of its running engines' processes (on the event loop only)."""

    def __init__(self) -> None:
        self._known: dict[Leader, Processes] = {}
        self._changed: set[Leader] = set()

    @property
    def changed(self) -> bool:
        return bool(self._changed)

    def note(self, leader: Leader, processes: Mapping[int, float] | None) -> None:
        """The engine's processes now; None once the engine is gone (its record goes too)."""
        if processes is None:
            self._known.pop(leader, None)
            self._changed.discard(leader)
            return
        found = tuple(sorted(processes.items()))
        if self._known.get(leader) != found:
            self._known[leader] = found
            self._changed.add(leader)

    def take(self) -> Seen:
        """A snapshot for one write; what changed counts as written from now on."""
        seen = Seen(dict(self._known), frozenset(self._changed))
        self._changed.clear()
        return seen

    def failed(self, seen: Seen) -> None:
        """The write of `seen` failed: what it changed is to be written again."""
        self._changed |= seen.changed & self._known.keys()


def _leader(record: EngineRecord) -> Leader:
    return record.pid, record.start_time
