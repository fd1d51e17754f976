"""Which control connection gets a slot and which one makes room (control/slots.py), on a
clock the test moves: shares per uid, the reserved slots, the oldest idle or stalled first."""

from __future__ import annotations

from functools import partial

from tests.fakes.clock import SkipClock
from vllmd.control.slots import Slot, Slots


class Connection:
    """What the listener would end: here it only notes that it was told to."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _slots(clock: SkipClock, **limits: int) -> Slots:
    return Slots(
        limits.get("total", 6),
        per_uid=limits.get("per_uid", 2),
        reserved=limits.get("reserved", 2),
        privileged=frozenset({0, 99}),
        stall_grace=1.0,
        clock=clock,
    )


def _take(slots: Slots, uid: int) -> tuple[Slot | None, Connection]:
    conn = Connection()
    return slots.take(uid, conn.cancel), conn


def test_root_takes_a_shared_slot_first_and_a_reserved_one_only_past_its_share() -> None:
    slots = _slots(SkipClock())
    first, _ = _take(slots, 0)
    second, _ = _take(slots, 0)
    third, _ = _take(slots, 0)
    assert first is not None and second is not None and third is not None
    assert [first.reserved, second.reserved, third.reserved] == [False, False, True]


def test_a_uid_at_its_share_makes_room_only_from_its_own_connections() -> None:
    clock = SkipClock()
    slots = _slots(clock)
    _, other_conn = _take(slots, 1001)  # idle the longest, but another uid's
    clock.skip(1)
    mine = [_take(slots, 1000) for _ in range(2)]
    busy = mine[1][0]
    assert busy is not None and mine[0][0] is not None
    busy.busy()
    clock.skip(1)
    new, _ = _take(slots, 1000)
    assert new is not None and not other_conn.cancelled
    assert mine[0][1].cancelled and mine[0][0] is not None and mine[0][0].evicted
    assert not mine[1][1].cancelled


def test_the_connection_idle_or_stalled_the_longest_makes_room() -> None:
    """A stream whose client left its output unread since t=0 goes before a connection idle
    since t=1; a stream read up to now, or unread for less than the grace, is not a
    candidate."""
    clock = SkipClock()
    slots = _slots(clock, total=5, per_uid=5, reserved=1)  # 4 shared
    taken = [_take(slots, 1000) for _ in range(4)]
    unread = {0: 100, 2: 0, 3: 100}
    for i in (0, 2, 3):
        slot = taken[i][0]
        assert slot is not None
        slot.streaming(partial(unread.__getitem__, i))
    clock.skip(1)
    idle = taken[1][0]
    assert idle is not None
    idle.idle()  # idle since t=1
    clock.skip(0.5)
    stream3 = taken[3][0]
    assert stream3 is not None
    unread[3] = 0
    stream3.stalled_for()  # seen drained at t=1.5
    unread[3] = 100
    clock.skip(1)  # t=2.5: stream 0 unread for 2.5 s, stream 3 for 1 s, idle since 1
    cancelled = []
    for _ in range(3):
        new, _ = _take(slots, 1001)
        assert new is not None
        new.busy()  # answering: not a candidate itself
        cancelled.append([conn.cancelled for _, conn in taken])
    refused, _ = _take(slots, 1001)
    assert cancelled == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, False, True],
    ]
    assert refused is None and len(slots) == 4  # the reader's stream stays


def test_a_stream_whose_client_reads_some_of_it_is_not_stalled() -> None:
    """Stalled is reading nothing: a client behind, but reading, keeps its stream."""
    clock = SkipClock()
    slot, _ = _take(_slots(clock), 1000)
    assert slot is not None
    queue = [500]
    slot.streaming(lambda: queue[0])
    slot.sent()
    clock.skip(2)
    queue[0] = 300  # it read 200 bytes
    assert slot.stalled_for() == 0.0 and slot.reclaimable_since(1.0) is None
    queue[0] = 800
    slot.sent()  # 500 more sent: not read yet, not the client's doing
    clock.skip(2)
    assert slot.stalled_for() >= 2.0 and slot.reclaimable_since(1.0) is not None
