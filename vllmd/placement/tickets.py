"""A model's pending load, shared by every request (and operator) waiting for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from vllmd.errors import VllmdError
from vllmd.instance.instance import Instance


class Interrupted(VllmdError):
    """The load was overtaken: the model was stopped on purpose while it started (a restart)
    and is still asked for. Never reaches a client: `ensure` queues it again."""


@dataclass(eq=False)
class Ticket:
    instance: Instance
    done: anyio.Event = field(default_factory=anyio.Event)
    error: VllmdError | None = None
    failures_at_start: int = 0
    clear_failed: bool = False  # a deliberate load: a `failed` model may start again

    def deliberate(self) -> None:
        """An operator asked for this load: it may start a `failed` model again."""
        self.clear_failed = True

    def resolve(self, error: VllmdError | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()
