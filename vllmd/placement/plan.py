"""The plan: per device, each model's memory in its parts (estimated, and measured where an
engine of it has run), which models can be resident together, and what can never fit.

Pure: a config, device totals and measured footprints in, a JSON-ready mapping out. The
daemon answers `GET /v1/plan` with it (`vllmctl plan`), and `vllmd check-config --plan` builds
it with the daemon down (device totals from NVML and the declared devices, footprints from the
state store when it is readable).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Any

from vllmd.config import Config, ModelConfig
from vllmd.placement.reservation import sized_parts
from vllmd.units import format_size


def build_plan(
    config: Config,
    totals: Mapping[str, int | None],
    measured: Mapping[str, int],
    reserved: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """`totals`: each device's memory (a GPU's CUDA total, or its declared cap; None: not
    known); `measured`: each model's last measured footprint per device; `reserved`: the
    daemon's reservation now where it differs from `memory` (a sized GPU model's, refined by
    its measured overhead)."""
    reserved = reserved or {}
    headroom = config.scheduler.headroom
    names = sorted({d for m in config.models.values() for d in m.devices})
    devices, warnings = [], []
    for name in names:
        models = [m for m in config.models.values() if name in m.devices]
        declared = config.devices.get(name)
        total = totals.get(name)
        if declared is not None and declared.memory:
            total = min(declared.memory, total) if total else declared.memory
        usable = total - headroom if total else None
        held = {  # (unsized: none)
            m.name: max(reserved.get(m.name, m.memory), measured.get(m.name, 0))
            for m in models
            if m.memory > 0
        }
        together = [
            [a, b] for a, b in combinations(sorted(held), 2) if _fits(held[a] + held[b], usable)
        ]
        for model in models:
            if usable is None:
                break  # a device of unknown size: nothing to judge
            if model.name not in held:
                continue  # not sized yet: said apart
            if held[model.name] > usable:
                warnings.append(
                    f'{model.name} can never fit device "{name}": {format_size(held[model.name])}'
                    f" > {format_size(usable)} after the headroom"
                )
            elif len(held) > 1 and not any(model.name in pair for pair in together):
                warnings.append(f'{model.name} cannot be resident with any other model on "{name}"')
        devices.append(
            {
                "name": name,
                "kind": declared.kind if declared is not None else "gpu",
                "total_bytes": total,
                "usable_bytes": usable,
                "models": [_model(m, measured.get(m.name), reserved.get(m.name)) for m in models],
                "together": together,
                "all_fit": len(held) == len(models) and _fits(sum(held.values()), usable),
            }
        )
    return {"headroom_bytes": headroom, "devices": devices, "warnings": warnings}


def _fits(need: int, usable: int | None) -> bool:
    return usable is not None and need <= usable


def _model(model: ModelConfig, measured: int | None, reserved: int | None) -> dict[str, Any]:
    sizing = model.sizing
    source = "explicit" if not model.memory_auto else "estimate" if sizing else "unsized"
    entry: dict[str, Any] = {
        "name": model.name,
        "memory_bytes": model.memory or None,
        "reserved_bytes": reserved or model.memory or None,
        "source": source,
        "measured_bytes": measured,
        "estimate": None,
        "unsized": model.unsized or None,
    }
    if sizing is not None:
        est = sizing.estimate
        entry["estimate"] = {
            "weights_bytes": est.weights,
            "kv_bytes": est.kv,
            "kv_sequences": est.kv_sequences,
            "max_model_len": est.max_model_len,
            "kv_bytes_per_token": est.kv_per_token,
            "workspace_bytes": est.workspace,
            # What the engine is expected to hold beside its parts now: once a start measured
            # it, the learned overhead in the reservation, else the prior the estimate used.
            "overhead_bytes": reserved - sized_parts(model) if reserved else est.overhead,
            "dtype": est.served_dtype,
            "architecture": sizing.shape.architecture,
        }
    return entry
