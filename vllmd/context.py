"""What every component is built with: one context object instead of the same bundle of
dependencies passed through every constructor. The config is read through it at the moment it
is needed, so a reload replaces it in one place."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from vllmd.config import Config
from vllmd.devices import DeviceProbe
from vllmd.engine.process import RuntimeOptions, Spawner
from vllmd.engine.version import EngineVersions
from vllmd.events import EventBus
from vllmd.overrides import Overrides
from vllmd.store.runs import new_run


class Context:
    def __init__(
        self,
        config: Config,
        *,
        events: EventBus,
        probe: DeviceProbe,
        spawner: Spawner,
        options: RuntimeOptions,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        versions: EngineVersions | None = None,
        run: str = "",
    ) -> None:
        self._config = config
        self.events = events
        self.probe = probe
        self.spawner = spawner
        self.options = options
        self.base_env = base_env
        self.clock = clock
        self.versions = versions or EngineVersions()  # each engine command's vLLM version
        # This run's id, listed in the state dir before any engine is spawned: every engine's
        # marker names it, so a later run's crash recovery finds all the engine's processes.
        self.run = run or new_run()
        self.overrides = Overrides()  # what operators changed at run time, over the config

    @property
    def config(self) -> Config:
        """The config in force."""
        return self._config

    def use_config(self, config: Config) -> None:
        """From now on, `config` is in force (what each part does with a change is its own)."""
        self._config = config
