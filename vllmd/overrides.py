"""What operators changed at run time, over the frozen config: runtime pins (`vllmctl pin`,
`unpin`) and the models loaded on purpose (`vllmctl load`; cleared by `unload` and by an LRU
eviction). One owner, read by the scheduler's ledger and the views; the state store persists
it."""

from __future__ import annotations

from vllmd.config import ModelConfig


class Overrides:
    def __init__(self) -> None:
        self._pins: dict[str, bool] = {}  # model -> pinned, where it differs from the config
        self._on_purpose: set[str] = set()

    def pinned(self, model: ModelConfig) -> bool:
        """Whether `model` is pinned now: a runtime pin, else its config."""
        return model.pinned or self._pins.get(model.name, False)

    def pin(self, name: str) -> None:
        self._pins[name] = True

    def unpin(self, name: str) -> None:
        self._pins.pop(name, None)

    def runtime_pins(self) -> frozenset[str]:
        return frozenset(n for n, p in self._pins.items() if p)

    def loaded_on_purpose(self, name: str) -> bool:
        return name in self._on_purpose

    def mark_loaded(self, name: str) -> None:
        self._on_purpose.add(name)

    def clear_loaded(self, name: str) -> None:
        self._on_purpose.discard(name)

    def forget(self, name: str) -> None:
        """A model removed from the config takes its overrides with it."""
        self._pins.pop(name, None)
        self._on_purpose.discard(name)
