"""Admission: the per-model bounded queues of requests waiting for a model to be ready, the
host-wide bound, and the Retry-After a rejected or timed-out client is given."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import anyio

from vllmd.context import Context
from vllmd.errors import QueueFull, QueueTimeout
from vllmd.instance.instance import Instance
from vllmd.instance.states import InstanceState

S = InstanceState
NO_ESTIMATE = 5.0  # Retry-After before any load of the model was measured


class Admission:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._depth: Counter[str] = Counter()
        self._total = 0

    def depth(self, name: str) -> int:
        """Requests waiting for model `name`."""
        return self._depth[name]

    @property
    def total(self) -> int:
        """Requests waiting for any model."""
        return self._total

    async def wait(self, instance: Instance, ready: Callable[[], Awaitable[None]]) -> None:
        """Queue for `instance` until `ready()` returns; QueueFull when a bound is reached,
        QueueTimeout after gateway.queue_timeout."""
        gateway = self._ctx.config.gateway
        name = instance.name
        if self._depth[name] >= gateway.max_queue:
            raise QueueFull(
                f"the queue of model {name} is full ({gateway.max_queue} requests)",
                retry_after=self.retry_after(instance),
            )
        if self._total >= gateway.max_queue_total:
            raise QueueFull(
                f"the request queue is full ({gateway.max_queue_total} requests)",
                retry_after=self.retry_after(instance),
            )
        self._depth[name] += 1
        self._total += 1
        try:
            with anyio.fail_after(gateway.queue_timeout):
                await ready()
        except TimeoutError:
            raise QueueTimeout(
                f"model {name} was not ready within {gateway.queue_timeout:g}s "
                f"(state {instance.state})",
                retry_after=self.retry_after(instance),
            ) from None
        finally:
            self._depth[name] -= 1
            self._total -= 1

    def retry_after(self, instance: Instance) -> float:
        """The estimated remaining load time: the last load's duration less the time this
        one has run; NO_ESTIMATE before any load was measured."""
        load = instance.load_seconds
        if load is None:
            return NO_ESTIMATE
        if instance.state is S.STARTING:
            elapsed: float = instance.clock() - instance.state_since
            return max(1.0, load - elapsed)
        return max(1.0, load)
