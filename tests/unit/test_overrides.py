"""Runtime pins hold while the config's `pinned` key keeps the value they were set over; a
change ends them for good (docs/design.md "State store"), and every change is told to watchers."""

from __future__ import annotations

import dataclasses

from vllmd.config import ModelConfig
from vllmd.overrides import Overrides

MODEL = ModelConfig(name="a", model="/m/a", memory=2**30)


def test_a_runtime_pin_ends_when_the_configs_pinned_key_changes() -> None:
    overrides = Overrides()
    told: list[int] = []
    overrides.watch(lambda: told.append(1))
    overrides.pin(MODEL)
    assert overrides.pinned(MODEL)
    pinned_in_config = dataclasses.replace(MODEL, pinned=True)
    overrides.reconcile({"a": pinned_in_config})  # a reload pins it in the config
    overrides.reconcile({"a": MODEL})  # and a later one unpins it there again
    assert not overrides.pinned(MODEL)  # the runtime pin did not come back
    assert overrides.runtime_pins() == {}
    assert len(told) == 2  # the pin, and its end


def test_restore_keeps_only_what_still_applies() -> None:
    overrides = Overrides()
    overrides.restore({"a": False, "gone": False}, frozenset({"a", "gone"}), {"a": MODEL})
    assert overrides.pinned(MODEL) and overrides.on_purpose() == {"a"}
    again = Overrides()
    again.restore({"a": True}, frozenset(), {"a": MODEL})  # pinned over a config since changed
    assert not again.pinned(MODEL)
