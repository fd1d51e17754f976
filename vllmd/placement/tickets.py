"""A model's pending load, shared by every request (and operator) waiting for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from vllmd.errors import InsufficientMemory, VllmdError
from vllmd.events import Kind
from vllmd.instance.instance import Instance
from vllmd.instance.states import InstanceState as S


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
    refused: bool = False  # vLLM refused its start once for want of free memory

    def deliberate(self) -> None:
        """An operator asked for this load: it may start a `failed` model again."""
        self.clear_failed = True

    def refusal(self) -> InsufficientMemory | None:
        """vLLM refused this load's start for want of free memory (never the model's failure):
        None the first time (plan it once more, on fresh readings); then the give-up, told
        as a `rejected` event."""
        if not self.refused:
            self.refused = True
            return None
        inst = self.instance
        inst.tell(Kind.REJECTED, reason="insufficient_memory", why=inst.last_error)
        return InsufficientMemory(inst.last_error or "vLLM refused the start", retry_after=30.0)

    def resolve(self, error: VllmdError | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


def settled(inst: Instance, before: int) -> bool:
    """A start or wake is over: ready, or not (a failed wake restarting via STOPPED is not).
    A stop asked before the start began (no transition at all) is over too."""
    if inst.state is S.STOPPED and not inst.wanted_up:
        return True
    return inst.transitions != before and inst.state in (S.READY, S.BACKOFF, S.FAILED)
