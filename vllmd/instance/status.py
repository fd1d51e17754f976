"""A model as its readers see it: one frozen status view (views, metrics, the control API and
the state store read this; nobody reads or writes an instance's insides)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllmd.config import ModelConfig
from vllmd.instance.states import InstanceState

if TYPE_CHECKING:
    from vllmd.instance.instance import Instance


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    model: ModelConfig
    state: InstanceState
    state_since: float  # unix seconds
    in_flight: int
    queue_depth: int  # requests waiting for the model (admission's count)
    held_bytes: int  # what the memory accounting holds on each of its devices now
    measured_bytes: int  # footprint measured after the last start, per device (0: none)
    last_used: float | None  # unix seconds a request last ended; None: never
    pid: int | None
    restarts: int  # restarts counted in the current restart window
    error: str | None  # the last failure, as said to clients
    load_seconds: float | None  # how long the last start took
    sleep_level: int  # the level it sleeps at, while sleeping
    pinned: bool = False  # in the config or at run time (`vllmctl pin`)
    reserved_bytes: int = 0  # its reservation per device now (0: `model.memory`)


def model_status(
    inst: Instance, queue_depth: int, held: int, measured: int, pinned: bool
) -> ModelStatus:
    """`inst`'s view now, from what it shows its readers; what others account for it is
    passed in (`Instance.status`)."""
    return ModelStatus(
        name=inst.name,
        model=inst.model,
        state=inst.state,
        state_since=inst.state_wall,
        in_flight=inst.in_flight,
        queue_depth=queue_depth,
        held_bytes=held,
        measured_bytes=measured,
        last_used=inst.last_used_wall,
        pid=inst.pid,
        restarts=len(inst.restarts),
        error=inst.last_error,
        load_seconds=inst.load_seconds,
        sleep_level=inst.sleep_level,
        pinned=pinned,
    )
