"""Reload as a pure function: the running config and a new one -> what must happen (docs/design.md
"Reload"). Nothing here touches a process; the supervisor carries the plan out."""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllmd.config.schema import Config, EngineConfig, ModelConfig

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


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    refused: tuple[str, ...]  # problems, one line per key: the plan must not be applied
    added: tuple[str, ...]
    removed: tuple[str, ...]
    restart: tuple[str, ...]  # engine-changing: restarted if running
    live: tuple[str, ...]  # changed, applied in place

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.restart or self.live)


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
    return ReloadPlan(refused, added, removed, tuple(restart), tuple(live))


def _changed_keys(old: ModelConfig | EngineConfig, new: ModelConfig | EngineConfig) -> set[str]:
    return {f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)}


def _show(config: Config, section: str, key: str) -> str:
    return str(getattr(getattr(config, section), key))
