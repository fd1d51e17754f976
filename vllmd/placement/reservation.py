"""What a model holds per device when resident: its `memory`, or, for a model on GPUs sized
from its files (memory = "auto"), the estimate's weights, KV cache and workspace with the
overhead its engine is expected to have now: what a start of it measured, once one has.

So the reservation of such a model follows what its engine was measured to take (the
estimate refined by measurement), and the fraction vLLM gets (engine/argv.py) is the parts
alone: an overhead learned larger than `engine.gpu_overhead` grows the reservation instead of
taking the KV cache the estimate promised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vllmd.config import ModelConfig

MiB = 1024**2


def reservation(model: ModelConfig, overhead: Callable[[], int]) -> int:
    """`overhead()`: the engine's expected GPU overhead per device (asked only for a model
    sized from its files on GPUs)."""
    sizing = model.sizing
    if sizing is None or not sizing.settings.gpu:
        return model.memory
    return math.ceil((gpu_parts(model) + overhead()) / MiB) * MiB


def gpu_parts(model: ModelConfig) -> int:
    """A sized model's weights + KV cache + workspace per device: its fraction's bytes."""
    assert model.sizing is not None
    est = model.sizing.estimate
    return est.weights + est.kv + est.workspace
