"""Reload as a pure function: the running config and a new one -> what must happen (docs/design.md
"Reload"). Nothing here touches a process; the supervisor carries the plan out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from vllmd.config.schema import AlertRule, Config, EngineConfig, ModelConfig

# A change to these restarts that model's engine (if it runs); every other model key is live.
RESTART_MODEL_KEYS = frozenset(
    {
        "model",
        "devices",
        "memory",
        "max_model_len",
        "dtype",
        "args",
        "env",
        "sleep_level",
        "kv_sequences",
        "cpus",
    }
)
# A change to these restarts every engine (gpu_overhead sizes every GPU engine's fraction).
RESTART_ENGINE_KEYS = frozenset({"command", "model_flag", "transport", "env", "gpu_overhead"})
# These need the daemon restarted: a reload that changes one changes nothing.
REFUSED = (
    ("gateway", "listen"),
    ("gateway", "max_connections"),
    ("metrics", "listen"),
    ("daemon", "control_socket"),
    ("daemon", "state_dir"),
)
# Fields that are not the file's keys: where it was read from, what sizing worked out. (A
# model's `memory` with "auto" on both sides is its estimate: see `_model_keys`.)
NOT_KEYS = frozenset({"path", "sizing", "unsized", "memory_auto"})
# The Python names of the keys a keyword spells otherwise in the file.
SPELLING = {"for_": "for"}
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    refused: tuple[str, ...]  # problems, one line per key: the plan must not be applied
    added: tuple[str, ...]
    removed: tuple[str, ...]
    restart: tuple[str, ...]  # engine-changing: restarted if running
    live: tuple[str, ...]  # changed, applied in place
    # Every changed key path as the file spells it (`gateway.api_keys`, `models.m.args`; a model,
    # device or alert rule added or removed as `models.NAME`), sorted. Never a value: api_keys
    # and env hold secrets.
    keys: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        # restart without a key: a model whose "auto" estimate changed.
        return bool(self.keys or self.added or self.removed or self.restart or self.live)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    refused = tuple(
        f"{section}.{key}: cannot change on reload ({_show(old, section, key)} -> "
        f"{_show(new, section, key)}): restart the daemon"
        for section, key in REFUSED
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    )
    engines_restart = _changed_keys(old.engine, new.engine) & RESTART_ENGINE_KEYS
    added = tuple(n for n in new.models if n not in old.models)
    removed = tuple(n for n in old.models if n not in new.models)
    restart, live = [], []
    for name, model in new.models.items():
        before = old.models.get(name)
        if before is None:
            continue
        keys = _changed_keys(before, model)
        if keys & RESTART_MODEL_KEYS or engines_restart:
            restart.append(name)
        elif keys:
            live.append(name)
    paths = tuple(sorted(changed_keys(old, new)))
    return ReloadPlan(refused, added, removed, tuple(restart), tuple(live), paths)


def changed_keys(old: Config, new: Config) -> Iterator[str]:
    """The key paths whose value differs between `old` and `new`, never the values."""
    for f in fields(old):
        if not f.compare or f.name in NOT_KEYS:
            continue  # (compare=False: the served-name index, built from the models)
        if f.name == "models":
            yield from _named("models", old.models, new.models, _model_keys)
        elif f.name == "devices":
            yield from _named("devices", old.devices, new.devices, _table_keys)
        elif f.name == "alerts":
            yield from _table_keys("alerts", old.alerts, new.alerts, skip="rules")
            yield from _named("alerts.rules", _rules(old), _rules(new), _table_keys)
        else:
            yield from _table_keys(f.name, getattr(old, f.name), getattr(new, f.name))


def _named(
    prefix: str,
    old: Mapping[str, T],
    new: Mapping[str, T],
    keys_of: Callable[[str, T, T], Iterator[str]],
) -> Iterator[str]:
    """Tables by name (models, devices, alert rules): one added or removed is one path."""
    for name in old.keys() | new.keys():
        if name in old and name in new:
            yield from keys_of(f"{prefix}.{name}", old[name], new[name])
        else:
            yield f"{prefix}.{name}"


def _table_keys(prefix: str, old: Any, new: Any, skip: str = "") -> Iterator[str]:
    """One table's changed keys (`old`, `new`: the same dataclass). A value that is a map (env,
    labels) or a listen address is one key: its entries are values."""
    for f in fields(old):
        if (
            f.name != skip
            and f.name not in NOT_KEYS
            and getattr(old, f.name) != getattr(new, f.name)
        ):
            yield f"{prefix}.{SPELLING.get(f.name, f.name)}"


def _model_keys(prefix: str, old: ModelConfig, new: ModelConfig) -> Iterator[str]:
    """A model's changed keys. Its `memory` only where the file's changed: two estimates of
    "auto" differ by sizing's work, not the file's (the model still restarts: plan_reload)."""
    yield from _table_keys(prefix, old, new, skip="memory")
    if old.memory_auto != new.memory_auto or (not old.memory_auto and old.memory != new.memory):
        yield f"{prefix}.memory"


def _rules(config: Config) -> dict[str, AlertRule]:
    return {rule.name: rule for rule in config.alerts.rules}


def _changed_keys(old: ModelConfig | EngineConfig, new: ModelConfig | EngineConfig) -> set[str]:
    return {f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)}


def _show(config: Config, section: str, key: str) -> str:
    return str(getattr(getattr(config, section), key))
