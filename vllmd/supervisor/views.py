"""How a model looks from outside: the one JSON shape shared by the gateway and control API."""

from __future__ import annotations

from typing import Any

from vllmd.instance.status import ModelStatus


def model_view(status: ModelStatus, created: int) -> dict[str, Any]:
    """OpenAI's model object, with vllmd's own fields under `vllmd`."""
    model = status.model
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "vllmd",
        "max_model_len": model.max_model_len,
        "vllmd": {
            "state": str(status.state),
            "state_since": status.state_since,
            "aliases": list(model.aliases),
            "devices": list(model.devices),
            "reserved_bytes": {device: status.held_bytes for device in model.devices},
            "measured_bytes": status.measured_bytes or None,
            "last_used": status.last_used,
            "in_flight": status.in_flight,
            "queue_depth": status.queue_depth,
            "pinned": status.pinned,
            "pid": status.pid,
            "restarts": status.restarts,
            "error": status.error,
        },
    }
