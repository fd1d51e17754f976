"""The supervisor: every configured model's `Instance`, and the way requests get a ready one.

The gateway asks `lease(model)`; the supervisor queues the request (bounded), has the engine
started if needed (concurrent requests share one start), and counts the request in flight
until it is done. Placement and eviction decisions are the scheduler's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

from vllmd.config import Config
from vllmd.devices import DeviceProbe
from vllmd.errors import ModelNotFound, QueueFull, QueueTimeout
from vllmd.events import EventBus
from vllmd.instance.instance import Instance, RuntimeOptions, Spawner
from vllmd.instance.states import InstanceState
from vllmd.metrics import Metrics
from vllmd.metrics_feed import count_events
from vllmd.placement.placer import Placer

S = InstanceState


class Supervisor:
    def __init__(
        self,
        config: Config,
        *,
        events: EventBus,
        spawner: Spawner,
        options: RuntimeOptions,
        probe: DeviceProbe,
        metrics: Metrics,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.events = events
        self.instances: dict[str, Instance] = {
            name: Instance(
                model,
                config.engine,
                options=options,
                events=events,
                spawner=spawner,
                base_env=base_env,
                clock=clock,
            )
            for name, model in config.models.items()
        }
        self.queued_total = 0
        count_events(events, metrics)
        self.placer = Placer(
            config,
            self.instances,
            probe=probe,
            events=events,
            clock=clock,
        )

    def get(self, name: str) -> Instance:
        """The instance of a model named by its name or an alias."""
        model = self.config.model_for(name)
        if model is None:
            raise ModelNotFound(f"The model `{name}` does not exist.")
        return self.instances[model.name]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for instance in self.instances.values():
                await tg.start(instance.run)
            await tg.start(self.placer.run)
            task_status.started()

    async def ensure_ready(self, instance: Instance) -> None:
        """Have the instance placed and started if needed; return once it is READY."""
        await self.placer.ensure(instance)

    @asynccontextmanager
    async def lease(self, instance: Instance) -> AsyncIterator[Instance]:
        """A READY instance for one request, counted in flight while the caller holds it."""
        if instance.state is not S.READY:
            await self._queue(instance)
        instance.begin_request()
        try:
            yield instance
        finally:
            instance.end_request()

    async def _queue(self, instance: Instance) -> None:
        gateway = self.config.gateway
        if instance.state is S.FAILED and not instance.wanted_up:
            await self.ensure_ready(instance)  # raises ModelFailed at once, queue or not
        if instance.queue_depth >= gateway.max_queue:
            raise QueueFull(
                f"the queue of model {instance.name} is full ({gateway.max_queue} requests)",
                retry_after=self._retry_after(instance),
            )
        if self.queued_total >= gateway.max_queue_total:
            raise QueueFull(
                f"the request queue is full ({gateway.max_queue_total} requests)",
                retry_after=self._retry_after(instance),
            )
        instance.queue_depth += 1
        self.queued_total += 1
        try:
            with anyio.fail_after(gateway.queue_timeout):
                await self.ensure_ready(instance)
        except TimeoutError:
            raise QueueTimeout(
                f"model {instance.name} was not ready within {gateway.queue_timeout:g}s "
                f"(state {instance.state})",
                retry_after=self._retry_after(instance),
            ) from None
        finally:
            instance.queue_depth -= 1
            self.queued_total -= 1

    def _retry_after(self, instance: Instance) -> float:
        """The estimated remaining load time: the last load's duration less the time this
        one has run; 5 s before any load was measured."""
        if instance.load_seconds is None:
            return 5.0
        if instance.state is S.STARTING:
            elapsed = instance.clock() - instance.state_since
            return max(1.0, instance.load_seconds - elapsed)
        return max(1.0, instance.load_seconds)

    async def load(self, instance: Instance) -> None:
        """A deliberate load: clears `failed`."""
        await self.placer.ensure(instance, clear_failed=True)

    async def unload(self, instance: Instance) -> None:
        instance.want_down()
        await instance.wait_state(S.STOPPED, S.FAILED)

    async def stop_all(self) -> None:
        """Stop every engine (in parallel), waiting until each one's processes are gone. No
        load starts once this is called."""
        self.placer.close()
        async with anyio.create_task_group() as tg:
            for instance in self.instances.values():
                tg.start_soon(self.unload, instance)
