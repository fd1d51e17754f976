"""The event bus: synchronous listeners never miss an event; queued subscribers get every event
in order up to their bound, and past it lose events for themselves only, counted by name."""

from __future__ import annotations

import itertools

import anyio
import pytest

from vllmd.events import Event, EventBus, Kind

pytestmark = pytest.mark.anyio


async def test_a_queued_subscriber_gets_every_event_of_a_burst_in_order() -> None:
    bus = EventBus()
    got: list[int] = []
    with bus.subscribe("store") as events:
        for i in range(10_000):
            bus.emit(Kind.STATE, "m", old="stopped", new="starting", n=i)
        with anyio.fail_after(5):
            async for event in events:
                got.append(int(event.fields["n"]))
                if len(got) == 10_000:
                    break
    assert got == list(range(10_000))
    assert bus.dropped["store"] == 0


async def test_overflow_drops_for_the_slow_subscriber_only_and_is_counted() -> None:
    bus = EventBus()
    heard: list[Event] = []
    bus.on_event(heard.append)
    with bus.subscribe("slow", bound=10) as slow, bus.subscribe("fast", bound=100) as fast:
        for i in range(50):
            bus.emit(Kind.EVICTED, "m", n=i)
        fast_got = [fast.receive_nowait().fields["n"] for _ in range(50)]
        slow_got = [slow.receive_nowait().fields["n"] for _ in range(10)]
        with pytest.raises(anyio.WouldBlock):
            slow.receive_nowait()
    assert fast_got == list(range(50))
    assert slow_got == list(range(10))  # the oldest kept, the rest dropped and counted
    assert bus.dropped == {"slow": 40, "fast": 0}
    assert [e.fields["n"] for e in heard] == list(range(50))  # synchronous: never misses one


async def test_event_ids_come_from_the_injected_counter() -> None:
    """The state store will own the ids (monotonic across restarts): the bus takes its seam."""
    ids = itertools.count(1000)
    bus = EventBus(next_id=ids.__next__, clock=lambda: 42.0)
    first = bus.emit(Kind.SPAWNED, "m", pid=1)
    second = bus.emit(Kind.CRASHED, "m", reason="crash")
    assert (first.id, second.id) == (1000, 1001)
    assert first.as_dict() == {"id": 1000, "time": 42.0, "kind": "spawned", "model": "m", "pid": 1}


async def test_two_queued_subscribers_need_distinct_names() -> None:
    bus = EventBus()
    with bus.subscribe("store"), pytest.raises(ValueError, match="store"), bus.subscribe("store"):
        pass


async def test_a_subscriber_that_left_frees_its_name_and_gets_nothing_it_missed() -> None:
    bus = EventBus()
    with bus.subscribe("follower"):
        pass
    bus.emit(Kind.STATE, "m", n=1)
    with bus.subscribe("follower") as again:
        bus.emit(Kind.STATE, "m", n=2)
        assert again.receive_nowait().fields["n"] == 2
        with pytest.raises(anyio.WouldBlock):
            again.receive_nowait()
