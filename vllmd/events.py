"""The event bus: everything that happened, told once, heard by whoever subscribes.

Publishers (supervisor, scheduler, gateway) call `emit`; the log, metrics, the state store and
alerts subscribe instead of being called from everywhere. Two kinds of subscribers:

- synchronous (`on_event`): called in-line by `emit`, in order, never missing an event; they
  must be cheap and never block (metrics counters);
- queued (`subscribe`): a bounded stream each; one that falls behind loses events (counted in
  `dropped`), it never slows an engine transition.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = structlog.get_logger("vllmd.events")


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    time: float  # unix seconds
    kind: str  # e.g. "state", "evicted", "crashed", "start_failed"
    model: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "kind": self.kind,
            "model": self.model,
            **self.fields,
        }


class EventBus:
    def __init__(self, history: int = 1000) -> None:
        self._ids = itertools.count(1)
        self._subscribers: list[MemoryObjectSendStream[Event]] = []
        self._listeners: list[Callable[[Event], None]] = []
        self.history: deque[Event] = deque(maxlen=history)
        self.dropped = 0

    def emit(self, kind: str, model: str | None = None, **fields: Any) -> Event:
        event = Event(id=next(self._ids), time=time.time(), kind=kind, model=model, fields=fields)
        self.history.append(event)
        log.info(kind, model=model, **fields)
        for listener in self._listeners:
            listener(event)
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(stream)
        return event

    def on_event(self, listener: Callable[[Event], None]) -> None:
        """A synchronous subscriber: called with every event, in order, inside `emit`."""
        self._listeners.append(listener)

    @contextmanager
    def subscribe(self, buffer: int = 1000) -> Iterator[MemoryObjectReceiveStream[Event]]:
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
            receive.close()
