"""What `vllmctl ps` and `vllmctl events` print for fields that are not plain scalars: USED
is the footprint now (none without a running engine); map-valued fields read as key=size."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest

from vllmd.cli import render

GIB = 1024**3
NOW = 1_800_000_000.0


def model(**fields: Any) -> dict[str, Any]:
    """A model as GET /v1/models returns it."""
    base: dict[str, Any] = {
        "name": "tiny-chat",
        "state": "stopped",
        "devices": ["cpu0"],
        "reserved_bytes": {"cpu0": 0},
        "measured_bytes": None,
        "last_used": None,
        "in_flight": 0,
        "pid": None,
    }
    return {**base, **fields}


USED = 4  # the USED column of `vllmctl ps`


@pytest.mark.parametrize("state", ["stopped", "failed", "backoff", "starting"])
def test_ps_used_is_a_dash_for_a_model_without_a_running_engine(state: str) -> None:
    """A stopped model showed its last measured footprint (`tiny-chat stopped cpu0 - 2.9GiB`)."""
    row = render.ps_row(model(state=state, measured_bytes=3 * GIB), NOW)
    assert row[USED] == "-"


def test_ps_used_is_a_dash_for_a_sleeping_engine_whose_figure_is_its_awake_one() -> None:
    row = render.ps_row(model(state="sleeping", pid=42, measured_bytes=3 * GIB), NOW)
    assert row[USED] == "-"


@pytest.mark.parametrize("state", ["ready", "draining"])
def test_ps_used_shows_the_footprint_of_a_running_engine(state: str) -> None:
    row = render.ps_row(model(state=state, pid=42, measured_bytes=3 * GIB), NOW)
    assert row[USED] == "3.0GiB"


def event(**fields: Any) -> dict[str, Any]:
    return {"id": 9, "time": 0.0, "kind": "evicting", "model": "a", **fields}


def test_event_line_prints_a_map_of_bytes_as_device_sizes() -> None:
    """`frees_bytes="{'cpu0': 3221225472}"` was Python's repr of the map."""
    line = render.event_line(event(frees_bytes={"cpu0": 3 * GIB, "cpu1": GIB // 2}), UTC)
    assert line.endswith(" frees_bytes=cpu0=3.0GiB,cpu1=512.0MiB")


def test_event_line_prints_a_byte_count_for_humans() -> None:
    line = render.event_line(event(used_bytes=3 * GIB, over_reservation_bytes=0), UTC)
    assert line.endswith(" used_bytes=3.0GiB over_reservation_bytes=0B")


def test_event_line_prints_other_maps_and_lists_without_python_reprs() -> None:
    line = render.event_line(
        event(labels={"alertname": "ModelDown", "model": "a"}, pids=[12, 13], added=[]), UTC
    )
    assert " labels=alertname=ModelDown,model=a" in line
    assert " pids=12,13" in line
    assert line.endswith(' added=""')
    assert "{" not in line and "[" not in line and "'" not in line


def test_event_line_quotes_a_map_whose_values_have_spaces() -> None:
    line = render.event_line(event(labels={"summary": "a is down"}), UTC)
    assert line.endswith(' labels="summary=a is down"')
