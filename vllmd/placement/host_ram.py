"""Host RAM that level-1 sleepers hold: each model's loaded weights, which vLLM copies to
(pinned) host memory when it sleeps at level 1 (vllm/device_allocator/cumem.py,
`CuMemAllocator.sleep`: a CPU backup of every tensor tagged "weights").

Per model, the best figure known: what a level-1 sleep measured (the rise of its engine's
process-tree RSS: the weights in the served dtype, which may differ from the checkpoint's),
kept in the state store across restarts; else the checkpoint's size on disk; else, where that
is unknown, the model's reservation.

A measurement holds only for the weights it measured: it carries their fingerprint (what the
engine loads: `model`, `dtype`, `args`, the GPU count, and the checkpoint's size on disk), and
a model whose fingerprint differs now (a reload or a restart with another checkpoint, dtype or
quantization; new files in place) is budgeted by its checkpoint until measured again. Pinned
host memory cannot be swapped out: a figure too small risks the host's OOM killer, so a rise
that cannot be the weights (`implausible`) is not kept either."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from vllmd.config import ModelConfig
from vllmd.context import Context
from vllmd.devices.host import host_memory_total
from vllmd.instance.instance import Instance
from vllmd.instance.launch import model_weights
from vllmd.store.records import HostMeasured

log = structlog.get_logger("vllmd.placer")
MiB = 2**20
NOISE = 16 * MiB  # an RSS rise below this is noise (Python's own allocations), never weights

WeightsKey = tuple[str, str, tuple[str, ...], int]


def weights_key(model: ModelConfig) -> WeightsKey:
    """What decides the weights a model's engine holds, besides its files' contents: where they
    come from, the dtype served, the engine's args (--quantization, --revision, --load-format,
    ...) and the number of GPUs they are split over."""
    return (model.model, model.dtype, model.args, len(model.devices))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A model's checkpoint as sized for `key`: its bytes on disk (None: unknown; 0, a
    directory without weight files, is unknown too) and the fingerprint of those weights."""

    key: WeightsKey
    size: int | None
    fingerprint: str

    @classmethod
    def of(cls, key: WeightsKey, size: int | None) -> Checkpoint:
        text = json.dumps([*key, size or None])
        return cls(key, size or None, hashlib.sha256(text.encode()).hexdigest()[:16])


class HostRam:
    def __init__(self, ctx: Context, instances: Mapping[str, Instance]) -> None:
        self._ctx = ctx
        self._instances = instances  # the supervisor's, read only
        self._checkpoints: dict[str, Checkpoint] = {}
        self._measured: dict[str, HostMeasured] = {}  # a level-1 sleep's RSS rise
        self.total = host_memory_total()

    async def size_weights(self) -> None:
        """Size every model's checkpoint not sized yet (a directory walk, in a thread)."""
        for inst in list(self._instances.values()):
            if self.checkpoint(inst) is None:
                await self.size(inst)

    async def size(self, inst: Instance) -> None:
        """Size `inst`'s checkpoint (in a thread); kept unless a reload replaced `inst`
        meanwhile (its successor is sized itself)."""
        key = weights_key(inst.model)
        size = await model_weights(inst.model, inst.engine, self._ctx.base_env)
        if self._instances.get(inst.name) is not inst:
            return
        if not size:
            log.info(
                "weights_unknown",
                model=inst.name,
                bound_bytes=inst.model.memory,
                reason="not a local directory nor in the HF cache, or no weight files there: "
                "its reservation bounds what a level-1 sleep keeps in host RAM until one is "
                "measured",
            )
        self._checkpoints[inst.name] = Checkpoint.of(key, size)

    async def replaced(self, inst: Instance) -> None:
        """A reload added `inst` or replaced its model's instance: its checkpoint is sized again
        (until then its reservation bounds it), and a figure measured for other weights is
        forgotten (one for the same weights, as a restart would read from the store, holds)."""
        self._checkpoints.pop(inst.name, None)
        await self.size(inst)
        if inst.name in self._measured and self.checkpoint(inst) and not self.measured(inst):
            del self._measured[inst.name]
            log.info("sleep_host_forgotten", model=inst.name, reason="its weights changed")

    def checkpoint(self, inst: Instance) -> Checkpoint | None:
        """`inst`'s checkpoint as sized for the weights it is configured with (None: not yet)."""
        found = self._checkpoints.get(inst.name)
        return found if found is not None and found.key == weights_key(inst.model) else None

    def held_asleep(self, inst: Instance) -> int:
        """What a level-1 sleep of `inst` keeps in host RAM."""
        measured = self._trusted(inst)
        if measured is not None:
            return measured.nbytes
        checkpoint = self.checkpoint(inst)
        return checkpoint.size if checkpoint and checkpoint.size else inst.model.memory

    def measured(self, inst: Instance) -> bool:
        """Whether a level-1 sleep measured the weights `inst` holds now."""
        return self._trusted(inst) is not None

    def _trusted(self, inst: Instance) -> HostMeasured | None:
        measured, checkpoint = self._measured.get(inst.name), self.checkpoint(inst)
        if measured is None or checkpoint is None:
            return None  # (not sized yet: the fingerprint is not known)
        return measured if measured.fingerprint == checkpoint.fingerprint else None

    async def implausible(self, inst: Instance, rise: int) -> str | None:
        """Why an RSS rise of `rise` bytes at a level-1 sleep of `inst` cannot be its weights
        (None: it can): not between a quarter of the checkpoint's size (4-bit quantization of
        16-bit files) and the larger of twice it (8-bit files served in 16 bits) and the
        model's memory; with no checkpoint size, under the noise or over the memory."""
        checkpoint = self.checkpoint(inst)
        if checkpoint is None or not checkpoint.size:
            await self.size(inst)  # again: the engine may have downloaded it since
            checkpoint = self.checkpoint(inst)
        size = checkpoint.size if checkpoint is not None else None
        memory = inst.model.memory * len(inst.model.devices)
        if rise < NOISE:
            return f"a rise under {NOISE // MiB} MiB is noise, not the weights"
        if size and rise < size // 4:
            return f"under a quarter of the checkpoint's {size} bytes"
        if size and rise > max(2 * size, memory):
            return f"over twice the checkpoint's {size} bytes and the model's memory"
        if not size and memory and rise > memory:
            return f"over the model's memory ({memory} bytes) and no checkpoint size to go by"
        return None

    def record(self, inst: Instance, nbytes: int) -> Checkpoint | None:
        """A level-1 sleep of `inst` raised its engine's RSS by `nbytes` (plausibly): kept for
        the weights it was measured for, returned (None: not sized, nothing kept)."""
        checkpoint = self.checkpoint(inst)
        if checkpoint is not None:
            self._measured[inst.name] = HostMeasured(nbytes, checkpoint.fingerprint)
        return checkpoint

    def learn(self, measured: Mapping[str, HostMeasured]) -> None:
        """What an earlier run measured (the state store's `sleep_measured` events): each holds
        while its fingerprint is the model's (none, from an older vllmd: never)."""
        for name, found in measured.items():
            self._measured.setdefault(name, found)
