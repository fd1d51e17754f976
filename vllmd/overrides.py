"""What operators changed at run time, over the frozen config: runtime pins (`vllmctl pin`,
`unpin`) and the models loaded on purpose (`vllmctl load`; cleared by `unload` and by an LRU
eviction). One owner, read by the scheduler's ledger and the views; the state store persists
it (told of every change by `watch`) and restores it at start.

A runtime pin remembers the config's `pinned` value it was set over, and holds only while that
key keeps the value (docs/design.md "State store": until that model's `pinned` key changes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vllmd.config import ModelConfig


class Overrides:
    def __init__(self) -> None:
        self._pins: dict[str, bool] = {}  # model -> the config's `pinned` when it was pinned
        self._on_purpose: set[str] = set()
        self._watchers: list[Callable[[], None]] = []

    def pinned(self, model: ModelConfig) -> bool:
        """Whether `model` is pinned now: its config, else a runtime pin set over this config."""
        return model.pinned or self._pins.get(model.name, not model.pinned) == model.pinned

    def pin(self, model: ModelConfig) -> None:
        self._pins[model.name] = model.pinned
        self._changed()

    def unpin(self, name: str) -> None:
        if self._pins.pop(name, None) is not None:
            self._changed()

    def runtime_pins(self) -> Mapping[str, bool]:
        """model -> the config's `pinned` value each runtime pin was set over."""
        return dict(self._pins)

    def loaded_on_purpose(self, name: str) -> bool:
        return name in self._on_purpose

    def on_purpose(self) -> frozenset[str]:
        return frozenset(self._on_purpose)

    def mark_loaded(self, name: str) -> None:
        if name not in self._on_purpose:
            self._on_purpose.add(name)
            self._changed()

    def clear_loaded(self, name: str) -> None:
        if name in self._on_purpose:
            self._on_purpose.discard(name)
            self._changed()

    def forget(self, name: str) -> None:
        """A model removed from the config takes its overrides with it."""
        if self._pins.pop(name, None) is not None or name in self._on_purpose:
            self._on_purpose.discard(name)
            self._changed()

    def restore(
        self, pins: Mapping[str, bool], loaded: frozenset[str], models: Mapping[str, ModelConfig]
    ) -> None:
        """What a previous run persisted, for the models still configured as they were."""
        self._pins.update(pins)
        self._on_purpose |= loaded & models.keys()
        self.reconcile(models)

    def reconcile(self, models: Mapping[str, ModelConfig]) -> None:
        """Drop the runtime pins whose model is gone or whose `pinned` key changed since the
        pin was set (a reload, a restart with another config): they end there for good."""
        void = [n for n, c in self._pins.items() if n not in models or models[n].pinned != c]
        for name in void:
            del self._pins[name]
        if void:
            self._changed()

    def watch(self, watcher: Callable[[], None]) -> None:
        """Call `watcher` (cheap, synchronous) after every change."""
        self._watchers.append(watcher)

    def _changed(self) -> None:
        for watcher in self._watchers:
            watcher()
