"""A model's pending load, shared by every request (and operator) waiting for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from vllmd.errors import InsufficientMemory, VllmdError
from vllmd.events import Kind
from vllmd.instance.instance import Instance


class Interrupted(VllmdError):
    """The load was overtaken: the model was stopped on purpose while it started (a restart)
    and is still asked for. Never reaches a client: `ensure` queues it again."""


class Refused(Interrupted):
    """vLLM refused the start for want of free memory: `ensure` plans once more with fresh
    readings, then answers `insufficient_memory`."""


class Refusals:
    """Starts vLLM refused for want of free memory, per model: the first is planned once more
    with fresh readings (Refused), the next gives up (insufficient_memory, told as a
    `rejected` event). The model is never marked failed for it."""

    def __init__(self) -> None:
        self._once: set[str] = set()

    def error(self, inst: Instance) -> VllmdError:
        if inst.name not in self._once:
            self._once.add(inst.name)
            return Refused(inst.last_error)
        self._once.discard(inst.name)
        inst.tell(Kind.REJECTED, reason="insufficient_memory", why=inst.last_error)
        return InsufficientMemory(inst.last_error or "vLLM refused the start", retry_after=30.0)

    def clear(self, name: str) -> None:
        self._once.discard(name)


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
