"""Host RAM that level-1 sleepers hold: each model's loaded weights, which vLLM copies to
(pinned) host memory when it sleeps at level 1 (vllm/device_allocator/cumem.py,
`CuMemAllocator.sleep`: a CPU backup of every tensor tagged "weights").

Per model, the best figure known: what its first level-1 sleep measured (the rise of its
engine's process-tree RSS: the weights in the served dtype, which may differ from the
checkpoint's), kept in the state store across restarts; else the checkpoint's size on disk;
else, where that is unknown, the model's reservation."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from vllmd.context import Context
from vllmd.devices.host import host_memory_total
from vllmd.instance.instance import Instance
from vllmd.instance.launch import model_weights

log = structlog.get_logger("vllmd.placer")


class HostRam:
    def __init__(self, ctx: Context, instances: Mapping[str, Instance]) -> None:
        self._ctx = ctx
        self._instances = instances  # the supervisor's, read only
        self._weights: dict[str, int] = {}  # the checkpoint's size (or the reservation)
        self._measured: dict[str, int] = {}  # a level-1 sleep's RSS rise
        self.total = host_memory_total()

    async def size_weights(self) -> None:
        """Size every model's checkpoint (a directory walk, in a thread)."""
        for name, inst in list(self._instances.items()):
            if name in self._weights:
                continue
            size = await model_weights(inst.model, inst.engine, self._ctx.base_env)
            if size is None:
                log.info(
                    "weights_unknown",
                    model=name,
                    bound_bytes=inst.model.memory,
                    reason="not a local directory nor in the HF cache: its reservation bounds "
                    "what a level-1 sleep keeps in host RAM until one is measured",
                )
            self._weights[name] = inst.model.memory if size is None else size

    def held_asleep(self, inst: Instance) -> int:
        """What a level-1 sleep of `inst` keeps in host RAM."""
        name = inst.name
        return self._measured.get(name) or self._weights.get(name, inst.model.memory)

    def measured(self, name: str) -> bool:
        return name in self._measured

    def record(self, name: str, nbytes: int) -> None:
        """A level-1 sleep of `name` raised its engine's RSS by `nbytes`."""
        self._measured[name] = nbytes

    def learn(self, measured: Mapping[str, int]) -> None:
        """What an earlier run measured (the state store's `sleep_measured` events)."""
        for name, nbytes in measured.items():
            self._measured.setdefault(name, nbytes)
