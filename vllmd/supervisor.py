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

from vllmd.config import Config, ModelConfig
from vllmd.engine import PlacedDevice
from vllmd.errors import ModelFailed, ModelNotFound, QueueFull, QueueTimeout
from vllmd.events import EventBus
from vllmd.instance import Instance, RuntimeOptions, Spawner
from vllmd.states import InstanceState

S = InstanceState
Placer = Callable[[ModelConfig], tuple[PlacedDevice, ...]]


class Supervisor:
    def __init__(
        self,
        config: Config,
        *,
        events: EventBus,
        spawner: Spawner,
        options: RuntimeOptions,
        placer: Placer,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.events = events
        self._placer = placer
        self._clock = clock
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
        self._start_slots = anyio.Semaphore(max(1, config.engine.max_concurrent_starts))

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
            task_status.started()

    async def ensure_ready(self, instance: Instance) -> None:
        """Have the instance started if it is not running, and wait until it is READY."""
        if instance.state is S.READY:
            return
        if instance.state is S.FAILED and not instance.wanted_up:
            raise ModelFailed(
                f"model {instance.name} failed: {instance.last_error}; "
                f"`vllmctl load {instance.name}` to try again"
            )
        if not instance.wanted_up:
            instance.placement = self._placer(instance.model)
            instance.want_up()
        await instance.wait_ready()

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
            await self.ensure_ready(instance)  # raises ModelFailed at once
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
        # The remaining start time is unknown until a load has been measured: say 5 s.
        return 5.0

    async def load(self, instance: Instance) -> None:
        """A deliberate load: clears `failed`."""
        instance.placement = self._placer(instance.model)
        instance.want_up()
        await instance.wait_ready()

    async def unload(self, instance: Instance) -> None:
        instance.want_down()
        await instance.wait_state(S.STOPPED, S.FAILED)

    async def stop_all(self) -> None:
        """Stop every engine (in parallel), waiting until each one's processes are gone."""
        async with anyio.create_task_group() as tg:
            for instance in self.instances.values():
                tg.start_soon(self.unload, instance)
