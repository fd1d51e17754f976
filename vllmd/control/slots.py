"""Who holds the control listener's connections, and which one goes when they are all taken
(docs/design.md "Control API", limits and peers).

Every connection holds a slot from the moment it is accepted. The slots are shared by every
uid, each holding at most `per_uid` of them, except the last `reserved`: those only root and
the daemon's uid may take, once the shared ones are not theirs to have. So no uid can take
every slot, and `vllmctl status` (systemd's ExecReload) as root always finds one.

A connection that finds no slot takes the one of a connection that is idle or stalled, the one
idle or stalled the longest first (as nginx reuses its oldest idle keep-alive connection when
its connections run out): idle is waiting for a request (before its first, or between two);
stalled is a streamed answer whose client has read nothing of what waits for it for
`stall_grace`.
With neither, the new connection is closed at once.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

PER_UID = 16  # a quarter of the listener's 64: four uids before the shared slots run out
RESERVED = 2  # kept for root and the daemon's uid (PostgreSQL keeps 3 of 100 for superusers)
STALL_GRACE = 1.0  # unread output older than this makes a stream stalled (a reader takes ms)


def unread_bytes(sock: socket.socket) -> int:
    """What `sock` sent that its peer has not read yet (SIOCOUTQ on a Unix socket); 0 once
    the socket is closed."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])


@dataclass(eq=False)
class Slot:
    """One connection's hold on the listener, and what it is doing now."""

    uid: int
    reserved: bool
    cancel: Callable[[], None]  # ends the connection: called when it is evicted
    clock: Callable[[], float]
    idle_since: float | None = None  # waiting for a request since then; None while busy
    evicted: bool = False
    _unread: Callable[[], int] | None = field(default=None, repr=False)  # while streaming
    _queued: int = field(default=0, repr=False)  # unread at the last look or send
    _read_at: float = field(default=0.0, repr=False)  # when its client was last seen to read

    def idle(self) -> None:
        self.idle_since = self.clock()

    def evict(self) -> None:
        """Its slot was taken by a new connection: end this one."""
        self.evicted = True
        self.cancel()

    def busy(self) -> None:
        self.idle_since = None

    def streaming(self, unread: Callable[[], int]) -> None:
        """From now on an answer is streamed; `unread` says how much of it waits unread."""
        self.idle_since = None
        self._unread = unread
        self._read_at = self.clock()

    def sent(self) -> None:
        """More of the stream was sent (what is unread now is not the client's doing)."""
        if self._unread is not None:
            self._queued = self._unread()

    def stalled_for(self) -> float:
        """How long the client of a stream has read nothing of what waits for it (0 when it
        has read everything)."""
        if self._unread is None:
            return 0.0
        now = self.clock()
        unread = self._unread()
        if unread == 0 or unread < self._queued:  # it read something since the last look
            self._read_at = now
        self._queued = unread
        return 0.0 if unread == 0 else now - self._read_at

    def reclaimable_since(self, grace: float) -> float | None:
        """Since when this slot may be taken by a new connection; None while it may not."""
        if self.idle_since is not None:
            return self.idle_since
        stalled = self.stalled_for()
        return self.clock() - stalled if stalled >= grace else None


class Slots:
    def __init__(
        self,
        total: int,
        *,
        per_uid: int = PER_UID,
        reserved: int = RESERVED,
        privileged: frozenset[int],
        stall_grace: float = STALL_GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= reserved < total or per_uid < 1:
            raise ValueError(f"bad connection limits: {total=} {per_uid=} {reserved=}")
        self.total = total
        self.per_uid = per_uid
        self.reserved = reserved
        self.privileged = privileged
        self.stall_grace = stall_grace
        self._clock = clock
        self._held: list[Slot] = []

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Slot]:
        return iter(list(self._held))

    def take(self, uid: int, cancel: Callable[[], None]) -> Slot | None:
        """A slot for a new connection of `uid` (idle until its first request), evicting the
        connection idle or stalled the longest when that makes room; None: no room."""
        pool = self._pool(uid)
        if pool is None:
            victims = [
                (since, slot)
                for slot in self._held
                if (since := slot.reclaimable_since(self.stall_grace)) is not None
                and self._pool(uid, without=slot) is not None
            ]
            if not victims:
                return None
            _, victim = min(victims, key=lambda pair: pair[0])
            self.release(victim)
            victim.evict()
            pool = self._pool(uid)
            assert pool is not None
        slot = Slot(uid, pool, cancel, self._clock)
        slot.idle()
        self._held.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """The connection ended (or was evicted): its slot is free. Idempotent."""
        if slot in self._held:
            self._held.remove(slot)

    def _pool(self, uid: int, without: Slot | None = None) -> bool | None:
        """Which slots a new connection of `uid` may take: False the shared ones, True the
        reserved ones, None neither (with `without` gone, when given)."""
        held = [slot for slot in self._held if slot is not without]
        shared = [slot for slot in held if not slot.reserved]
        mine = sum(1 for slot in shared if slot.uid == uid)
        if mine < self.per_uid and len(shared) < self.total - self.reserved:
            return False
        if uid in self.privileged and len(held) - len(shared) < self.reserved:
            return True
        return None
