"""What a session (session.py) reports and what it needs of its model's instance: how a
start, a session, a sleep or a wake ended, and the `Owner` protocol the instance fulfils."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol

from vllmd.events import Kind
from vllmd.instance.states import InstanceState, Want


class Startup(Enum):
    """How waiting for a new engine's readiness (or a warm-up) ended."""

    READY = "ready"
    EXITED = "exited"  # the engine died while starting
    TIMEOUT = "timeout"  # not ready within engine.startup_timeout (or no warm-up answer)
    UNWANTED = "unwanted"  # no longer wanted: to be stopped
    FAILED = "failed"  # the warm-up failed: a 5xx, a lost connection


@dataclass(frozen=True, slots=True)
class Warmed:
    """How a warm-up ended: READY, or why not (`error`: what failed, for TIMEOUT/FAILED)."""

    outcome: Startup
    error: str = ""


class End(StrEnum):
    """How one engine's session ended (its processes are gone by then)."""

    STOPPED = "stopped"  # on purpose
    CRASHED = "crashed"  # exited by itself after it was ready
    UNHEALTHY = "unhealthy"  # failed engine.health_failures checks in a row
    START_FAILED = "start_failed"  # could not be spawned, or died while starting
    START_TIMEOUT = "start_timeout"


START_FAILURES = frozenset({End.START_FAILED, End.START_TIMEOUT})


class Switch(Enum):
    """How a sleep or a wake ended."""

    DONE = "done"
    REFUSED = "refused"  # the engine answered an error status
    UNREACHABLE = "unreachable"  # no answer, or one vLLM never gives
    UNCONFIRMED = "unconfirmed"  # /is_sleeping disagrees afterwards


@dataclass(frozen=True, slots=True)
class Switched:
    outcome: Switch
    error: str = ""  # what went wrong, for the event and the model's error


DONE = Switched(Switch.DONE)


class Owner(Protocol):
    """What a session needs of its model's instance (instance.py): what is wanted, the
    requests in flight, and the transitions and failures it reports."""

    name: str
    in_flight: int

    @property
    def want(self) -> Want: ...

    @property
    def sleep_to(self) -> int: ...

    async def until(self, condition: Callable[[], bool]) -> None: ...

    def transition(self, new: InstanceState, **fields: object) -> None: ...

    def ready(self, version: str | None) -> None:
        """STARTING -> READY: the start is over (`version`: the engine's vLLM, if known)."""

    def woke(self, seconds: float) -> None:
        """WAKING -> READY."""

    def failed(self, error: str, reason: str | None = None) -> None:
        """The engine failed (`error` for clients); with a `reason` it has died or must be
        restarted: the instance leaves its state at once (BACKOFF)."""

    def oom_killed(self) -> None: ...

    def tell(self, kind: Kind, **fields: object) -> None: ...
