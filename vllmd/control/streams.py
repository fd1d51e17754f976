"""The control API's two readers that can follow (docs/design.md "Control API"): a model's
engine output (`GET /v1/models/{name}/logs`) and the event log (`GET /v1/events`). Each
answers a JSON object, or with `follow` a stream of NDJSON lines: the events until the client
leaves, an engine's output until then or until its model is removed (its last line says so).

Every query value is read before anything is sent: a bad one is a whole 400, never a stream
that breaks off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from vllmd.control.listener import Streamed
from vllmd.control.query import Since, flag, int_param, parse_since
from vllmd.events import EventBus
from vllmd.instance.instance import Instance
from vllmd.store import StateStore

MAX_TAIL = 2000  # the output ring's size
DEFAULT_EVENTS = 100
MAX_EVENTS = 1000


def ndjson(item: object) -> bytes:
    return json.dumps(item, default=str).encode() + b"\n"


def logs(instance: Instance, query: dict[str, str]) -> dict[str, Any] | Streamed:
    tail = min(int_param(query, "tail", 100, 0, 10**9), MAX_TAIL)
    output = instance.output
    lines, cursor = output.tail(tail)
    if not flag(query, "follow"):
        return {"model": instance.name, "lines": lines}

    async def stream() -> AsyncIterator[bytes]:
        for line in lines:
            yield ndjson({"line": line})
        async for line in output.follow(cursor):  # nothing after the tail is lost
            yield ndjson({"line": line})

    return Streamed(stream())


class EventLog:
    """The event log as the control API reads it: the store's (it outlives restarts), else
    the bus's recent history; followed from the bus."""

    def __init__(self, events: EventBus, store: StateStore | None) -> None:
        self._events = events
        self._store = store
        self._followers = 0

    async def read(self, query: dict[str, str]) -> dict[str, Any] | Streamed:
        raw = query.get("since")
        since = parse_since(raw)
        limit = int_param(query, "limit", DEFAULT_EVENTS, 1, MAX_EVENTS)
        follow = flag(query, "follow")
        newest = raw is None  # no `since`: the latest `limit`; else the first after it
        everything = follow and raw is not None  # a follower gets all after `since`, then more

        async def backlog(since: Since, count: int) -> list[dict[str, Any]]:
            if self._store is not None:
                return await self._store.events(
                    after_id=since.after_id, from_time=since.from_time, limit=count, newest=newest
                )
            found = [d for d in (e.as_dict() for e in self._events.history) if since.keeps(d)]
            return found[-count:] if newest else found[:count]

        if not follow:
            return {"events": await backlog(since, limit)}
        self._followers += 1
        name = f"control-follower-{self._followers}"

        async def stream() -> AsyncIterator[bytes]:
            # Subscribed before the backlog is read: an event in between comes once.
            with self._events.subscribe(name, bound=1000) as events:
                last, page = 0, since
                while True:  # a follower from `since` gets all of it, page by page
                    past = await backlog(page, MAX_EVENTS if everything else limit)
                    for each in past:
                        yield ndjson(each)
                    last = past[-1]["id"] if past else last
                    if not everything or len(past) < MAX_EVENTS:
                        break
                    page = Since(after_id=last)
                async for event in events:
                    if event.id > last:
                        yield ndjson(event.as_dict())

        return Streamed(stream())
