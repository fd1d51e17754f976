"""The event bus: everything that happened, told once, heard by whoever subscribes.

Publishers (instances, the placer, soon the control API) call `emit` with one of the closed
set of `Kind`s; the log, metrics, the state store and alerts subscribe instead of being called
from everywhere. Two kinds of subscribers (docs/design.md "State store"):

- synchronous (`on_event`): called in-line by `emit`, in order, never missing an event; they
  must be cheap and never block (metrics counters);
- queued (`subscribe`): a bounded stream each, every event in order up to its bound; past it
  the subscriber loses events, counted per subscriber in `dropped`. A slow subscriber never
  slows an engine transition or a request.

Event ids come from an injected counter: the state store owns it, so ids stay monotonic across
restarts.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = structlog.get_logger("vllmd.events")
QUEUE_BOUND = 10_000  # a queued subscriber's default bound


class Kind(StrEnum):
    """Every kind of event vllmd tells (the fields each carries)."""

    STATE = "state"  # old, new (+ reason, delay, load_seconds, wake_seconds, level, ...)
    SPAWNED = "spawned"  # pid, pgid, start_time (unix s), boot_id, marker, address
    CRASHED = "crashed"  # reason (crash|oom), status
    START_FAILED = "start_failed"  # error, result (failed|timeout)
    START_PROFILING_RETRY = "start_profiling_retry"  # retries
    START_REFUSED = "start_refused"  # error: vLLM found too little free memory (re-planned)
    MODEL_FAILED = "model_failed"  # restarts
    SLEEP_FAILED = "sleep_failed"  # error (+ level)
    WAKE_FAILED = "wake_failed"  # error
    EVICTING = "evicting"  # action, reason, for_model, frees_bytes, level
    EVICTED = "evicted"  # action, reason, for_model, freed_bytes
    LEAKY_SLEEP = "leaky_sleep"  # residue_bytes, assumed_bytes
    SLEEP_MEASURED = "sleep_measured"  # level, host_bytes, fingerprint, checkpoint_bytes
    MEASURED = "measured"  # used_bytes, over_reservation_bytes (+ overhead_bytes on GPUs)
    # device, why, cause, fix: NVML lists none of the engine's pids (another pid namespace) or no
    # figures (WDDM): its GPUs are budgeted by reservation. Once per device.
    GPU_PIDS_UNSEEN = "gpu_pids_unseen"
    REJECTED = "rejected"  # reason, why
    RELEASE_UNVERIFIED = "release_unverified"  # problem
    MODEL_ADDED = "model_added"  # replaced (bool)
    MODEL_REMOVED = "model_removed"  # by a reload
    RELOADED = "reloaded"  # added, removed, restarted, live (model names); keys (key paths)
    RELOAD_FAILED = "reload_failed"  # problems
    ORPHANS_KILLED = "orphans_killed"  # pids, pgid, survivors: a previous run's engine
    ALERT = "alert"  # alertname, alertstate (pending|firing|resolved), labels, value
    CONTROL = "control"  # action, uid, pid, result (accepted|forbidden): an operator's call


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    time: float  # unix seconds
    kind: Kind
    model: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "kind": str(self.kind),
            "model": self.model,
            **self.fields,
        }


class EventBus:
    def __init__(
        self,
        *,
        history: int = 1000,
        next_id: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._next_id = next_id or itertools.count(1).__next__
        self._clock = clock
        self._queues: dict[str, MemoryObjectSendStream[Event]] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._dropped: dict[str, int] = {}
        self.history: deque[Event] = deque(maxlen=history)  # the latest events, newest last

    @property
    def dropped(self) -> Mapping[str, int]:
        """Events lost per queued subscriber (those that fell more than their bound behind)."""
        return self._dropped

    def emit(self, kind: Kind, model: str | None = None, **fields: Any) -> Event:
        event = Event(self._next_id(), self._clock(), kind, model, fields)
        self.history.append(event)
        log.info(kind.value, model=model, **fields)
        for listener in self._listeners:
            listener(event)
        for name, stream in list(self._queues.items()):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                self._dropped[name] += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                del self._queues[name]
        return event

    def on_event(self, listener: Callable[[Event], None]) -> None:
        """A synchronous subscriber: called with every event, in order, inside `emit`."""
        self._listeners.append(listener)

    @contextmanager
    def subscribe(
        self, name: str, bound: int = QUEUE_BOUND
    ) -> Iterator[MemoryObjectReceiveStream[Event]]:
        """A queued subscriber named `name` (its drops are counted under it) for the block."""
        if name in self._queues:
            raise ValueError(f"an event subscriber named {name!r} exists already")
        send, receive = anyio.create_memory_object_stream[Event](bound)
        self._queues[name] = send
        self._dropped.setdefault(name, 0)
        try:
            yield receive
        finally:
            self._queues.pop(name, None)
            send.close()
            receive.close()
