"""How a model looks from outside: the one JSON shape shared by the gateway and control API."""

from __future__ import annotations

import time
from typing import Any

from vllmd.instance.instance import Instance


def wall_time(instance: Instance, clock_value: float) -> float | None:
    """A clock reading of the instance, as unix time (None for 'never')."""
    if not clock_value:
        return None
    return time.time() - (instance.clock() - clock_value)


def model_view(instance: Instance, created: int, held: int) -> dict[str, Any]:
    """OpenAI's model object, with vllmd's own fields under `vllmd`; `held` is what the
    memory accounting holds for it on each of its devices."""
    model = instance.model
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "vllmd",
        "max_model_len": model.max_model_len,
        "vllmd": {
            "state": str(instance.state),
            "aliases": list(model.aliases),
            "devices": list(model.devices),
            "reserved_bytes": {device: held for device in model.devices},
            "measured_bytes": instance.measured_bytes or None,
            "last_used": wall_time(instance, instance.last_used),
            "in_flight": instance.in_flight,
            "queue_depth": instance.queue_depth,
            "pinned": model.pinned,
            "pid": instance.process.pid if instance.process is not None else None,
            "restarts": len(instance.restarts),
            "error": instance.last_error,
        },
    }
