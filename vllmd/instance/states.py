"""The closed set of instance states and the one table of legal transitions."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

Want = Literal["up", "down", "asleep"]  # what is asked of an instance: its desired state


class InstanceState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


S = InstanceState

TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    # STOPPED -> STARTING: a request, a load, a preload.
    S.STOPPED: frozenset({S.STARTING}),
    # STARTING -> READY (health 200 + warm-up), -> STOPPING (stop asked mid-start),
    # -> BACKOFF (exited or timed out; retried), -> FAILED (too many restarts).
    S.STARTING: frozenset({S.READY, S.STOPPING, S.BACKOFF, S.FAILED}),
    # READY -> DRAINING (stop/sleep asked), -> BACKOFF (crash, unhealthy), -> FAILED.
    S.READY: frozenset({S.DRAINING, S.BACKOFF, S.FAILED}),
    # DRAINING -> STOPPING / SLEEPING once in-flight requests are done (or drain_timeout),
    # -> BACKOFF / FAILED if the engine dies meanwhile.
    S.DRAINING: frozenset({S.STOPPING, S.SLEEPING, S.BACKOFF, S.FAILED}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.BACKOFF, S.FAILED}),
    # WAKING -> READY, -> STOPPING (a failed wake restarts the engine), -> BACKOFF (crash).
    S.WAKING: frozenset({S.READY, S.STOPPING, S.BACKOFF, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF}),
    # BACKOFF -> STARTING after the delay, -> STOPPED (stop asked), -> FAILED.
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FAILED}),
    # FAILED is left only on purpose: load/restart/reload (-> STARTING) or unload (-> STOPPED).
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}

# The derived sets, in one place.
# An instance holds its full reservation on each of its devices.
HOLDS_RESERVATION = frozenset({S.STARTING, S.READY, S.DRAINING, S.WAKING, S.STOPPING})
# ... and in backoff too: its actor restarts it in a moment, a neighbour must not take it.
HOLDING = HOLDS_RESERVATION | {S.BACKOFF}
# Its memory is changing: one such operation per device at a time.
MEMORY_OPERATIONS = frozenset({S.STARTING, S.WAKING, S.DRAINING, S.STOPPING})
# Loading weights and sizing a KV cache: limited by engine.max_concurrent_starts.
STARTS = frozenset({S.STARTING, S.WAKING})
# Its engine's measured footprint is current (measured once ready, by the engine serving now).
MEASURED = frozenset({S.READY, S.DRAINING})
# May be chosen as an eviction victim.
EVICTABLE = frozenset({S.READY, S.SLEEPING, S.BACKOFF})
# An engine process is up or coming up: a reload that replaces the model starts it again.
RUNNING = frozenset({S.STARTING, S.READY, S.DRAINING, S.SLEEPING, S.WAKING})
# The engine answers /metrics (a starting one has no server yet; a stopping one is going).
SCRAPED = frozenset({S.READY, S.DRAINING, S.SLEEPING, S.WAKING})


class IllegalTransition(RuntimeError):
    """A transition outside TRANSITIONS: always a bug in vllmd."""


def check_transition(old: InstanceState, new: InstanceState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"illegal transition {old} -> {new}")
