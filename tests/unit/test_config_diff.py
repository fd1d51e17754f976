"""Reload planned as a pure function: which keys restart an engine, which apply live, which
are refused, and what is added or removed (docs/design.md "Reload")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vllmd.config import Config, parse_config
from vllmd.config.diff import plan_reload


def _config(tmp_path: Path, **models: dict[str, object]) -> Config:
    return parse_config(
        {
            "devices": {"cpu0": {"kind": "cpu", "memory": "64GiB"}},
            "models": {
                name: {"model": f"fake/{name}", "devices": ["cpu0"], "memory": "3GiB", **spec}
                for name, spec in models.items()
            },
        },
        tmp_path,
    )


def test_nothing_changed_is_an_empty_plan(tmp_path: Path) -> None:
    old = _config(tmp_path, a={})
    plan = plan_reload(old, _config(tmp_path, a={}))
    assert not plan.changed and plan.refused == ()


def test_engine_keys_restart_and_the_rest_applies_live(tmp_path: Path) -> None:
    old = _config(tmp_path, a={}, b={}, c={}, gone={})
    new = _config(
        tmp_path,
        a={"memory": "4GiB"},
        b={"aliases": ["bee"], "pinned": True, "idle_ttl": "1h", "priority": 3},
        c={"args": ["--enforce-eager"]},
        added={},
    )
    plan = plan_reload(old, new)
    assert (plan.restart, plan.live, plan.added, plan.removed) == (
        ("a", "c"),
        ("b",),
        ("added",),
        ("gone",),
    )


def test_an_engine_wide_key_restarts_every_model_and_a_timeout_restarts_none(
    tmp_path: Path,
) -> None:
    old = _config(tmp_path, a={}, b={})
    command = dataclasses.replace(old, engine=dataclasses.replace(old.engine, command=("x",)))
    timeout = dataclasses.replace(old, engine=dataclasses.replace(old.engine, stop_timeout=9.0))
    assert plan_reload(old, command).restart == ("a", "b")
    assert not plan_reload(old, timeout).restart


def test_keys_that_need_a_daemon_restart_are_refused_naming_the_key(tmp_path: Path) -> None:
    old = _config(tmp_path, a={})
    moved = dataclasses.replace(
        old,
        gateway=dataclasses.replace(old.gateway, max_connections=7),
        daemon=dataclasses.replace(old.daemon, state_dir=tmp_path / "elsewhere"),
    )
    refused = plan_reload(old, moved).refused
    assert len(refused) == 2
    assert refused[0].startswith("gateway.max_connections: cannot change on reload (")
    assert refused[1].startswith("daemon.state_dir: cannot change on reload (")


SECRET = "sk-very-secret-key"


def _file(tmp_path: Path, **sections: object) -> Config:
    """A whole config file's data: one cpu device, model m, and `sections` merged over it."""
    data: dict[str, object] = {
        "devices": {"cpu0": {"kind": "cpu", "memory": "64GiB"}},
        "models": {"m": {"model": "fake/m", "devices": ["cpu0"], "memory": "3GiB"}},
    }
    return parse_config({**data, **sections}, tmp_path)


def test_keys_name_every_changed_key_outside_the_models_and_no_value(tmp_path: Path) -> None:
    """The keys a reload applies without touching a model are listed too, by path only."""
    old = _file(tmp_path)
    new = _file(
        tmp_path,
        gateway={"api_keys": [SECRET], "max_queue": 9, "queue_timeout": "1m"},
        engine={"health_failures": 7},
        devices={"cpu0": {"kind": "cpu", "memory": "32GiB"}},
    )
    plan = plan_reload(old, new)
    assert plan.keys == (
        "devices.cpu0.memory",
        "engine.health_failures",
        "gateway.api_keys",
        "gateway.max_queue",
        "gateway.queue_timeout",
    )
    assert plan.changed and (plan.restart, plan.live, plan.added, plan.removed) == ((),) * 4
    assert SECRET not in repr(plan)


def test_keys_name_a_model_or_device_added_or_removed_and_a_map_not_its_entries(
    tmp_path: Path,
) -> None:
    old = _config(tmp_path, a={}, gone={})
    new = _config(
        tmp_path,
        a={"args": ["--enforce-eager"], "env": {"HF_TOKEN": SECRET}, "priority": 2},
        new={},
    )
    devices = {**new.devices, "cpu1": dataclasses.replace(new.devices["cpu0"], name="cpu1")}
    new = dataclasses.replace(new, devices=devices)
    plan = plan_reload(old, new)
    assert plan.keys == (
        "devices.cpu1",
        "models.a.args",
        "models.a.env",
        "models.a.priority",
        "models.gone",
        "models.new",
    )
    assert plan_reload(new, old).keys == (
        "devices.cpu1",
        "models.a.args",
        "models.a.env",
        "models.a.priority",
        "models.gone",
        "models.new",
    )
    assert SECRET not in repr(plan)


def test_keys_name_alerts_and_rules_in_the_files_spelling(tmp_path: Path) -> None:
    old = _file(tmp_path)
    rules = [
        {"name": "VllmdModelRestarts", "threshold": 5, "for": "1m"},
        {"name": "Mine", "signal": "model_restarts", "op": ">", "threshold": 1},
        {"name": "VllmdEvictionThrash", "enabled": False},
    ]
    new = _file(tmp_path, alerts={"interval": "30s", "labels": {"team": "x"}, "rules": rules})
    assert plan_reload(old, new).keys == (
        "alerts.interval",
        "alerts.labels",
        "alerts.rules.Mine",
        "alerts.rules.VllmdEvictionThrash",
        "alerts.rules.VllmdModelRestarts.for",
        "alerts.rules.VllmdModelRestarts.threshold",
    )


def test_what_the_file_does_not_say_is_no_changed_key(tmp_path: Path) -> None:
    """The file's own path and what sizing worked out are not keys: a model restarted for a
    new estimate alone is restarted, and names no key."""
    old = _file(tmp_path)
    moved = dataclasses.replace(old, path=tmp_path / "elsewhere.toml")
    model = old.models["m"]
    auto = dataclasses.replace(model, memory_auto=True, memory=2 * 2**30)
    estimated = dataclasses.replace(old, models={"m": auto})
    reestimated = dataclasses.replace(
        old, models={"m": dataclasses.replace(auto, memory=5 * 2**30, unsized="not there yet")}
    )
    assert plan_reload(old, moved).keys == () and not plan_reload(old, moved).changed
    plan = plan_reload(estimated, reestimated)
    assert plan.keys == () and plan.restart == ("m",) and plan.changed
    assert plan_reload(old, estimated).keys == ("models.m.memory",)
