"""An instance's changes told to whoever waits on them: its own waits (`until`) and its
listeners (`listen`), woken on every change. Every wait of the actor is on this one event."""

from __future__ import annotations

from collections.abc import Callable

import anyio


class Changes:
    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._changed = anyio.Event()

    def listen(self, listener: Callable[[], None]) -> None:
        """`listener` is called on every change, after the waits are woken."""
        self._listeners.append(listener)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds, looked at again on every change."""
        while not condition():
            await self._changed.wait()

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()  # a fresh one for the next change
        for listener in self._listeners:
            listener()
