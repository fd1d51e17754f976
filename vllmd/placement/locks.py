"""Who is changing memory where: the placer's one bookkeeping of busy devices, busy models and
start slots. A `Hold` is taken at once (so a planning pass never hands the same device out
twice) and let go when its block ends, whatever happens in it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from types import TracebackType

import anyio


class Locks:
    def __init__(self) -> None:
        self._devices: Counter[str] = Counter()
        self._models: Counter[str] = Counter()
        self.starts = 0  # starts and wakes under way (engine.max_concurrent_starts)
        self._released: anyio.Event | None = None  # made by the first waiter (in a task)

    def hold(
        self, devices: Iterable[str], models: Iterable[str] = (), *, start: bool = False
    ) -> Hold:
        """Hold `devices` and `models` (and a start slot) from now until the block ends:
        `with locks.hold(...)` (or `async with`); a hold made here and entered by a task
        started later keeps them in between."""
        return Hold(self, frozenset(devices), frozenset(models), start)

    def busy_devices(self) -> frozenset[str]:
        return frozenset(self._devices)

    def device_busy(self, devices: Iterable[str]) -> bool:
        return any(d in self._devices for d in devices)

    def model_busy(self, name: str) -> bool:
        return name in self._models

    async def released(self) -> None:
        """Return once a hold is let go (any one)."""
        if self._released is None:
            self._released = anyio.Event()
        await self._released.wait()

    def _take(self, hold: Hold) -> None:
        self._devices.update(hold.devices)
        self._models.update(hold.models)
        self.starts += hold.start

    def _give_back(self, hold: Hold) -> None:
        self._devices.subtract(hold.devices)
        self._models.subtract(hold.models)
        self._devices += Counter()  # drop the zeros
        self._models += Counter()
        self.starts -= hold.start
        if self._released is not None:
            self._released.set()
            self._released = None


class Hold:
    def __init__(
        self, locks: Locks, devices: frozenset[str], models: frozenset[str], start: bool
    ) -> None:
        self.devices = devices
        self.models = models
        self.start = start
        self._locks: Locks | None = locks
        locks._take(self)

    def release(self) -> None:
        """Let go (once; later calls do nothing)."""
        if self._locks is not None:
            locks, self._locks = self._locks, None
            locks._give_back(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
