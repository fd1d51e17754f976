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
