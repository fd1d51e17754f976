"""What `vllmctl` prints for the control API's JSON: sizes, ages, tables, event lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from vllmd.cli import render
from vllmd.cli.vllmctl import since_param, unreachable_message

GIB = 1024**3
NOW = 1_800_000_000.0


def model(**fields: Any) -> dict[str, Any]:
    """A model as GET /v1/models returns it."""
    base: dict[str, Any] = {
        "name": "tiny-chat",
        "state": "stopped",
        "aliases": [],
        "devices": ["cpu0"],
        "reserved_bytes": {"cpu0": 0},
        "measured_bytes": None,
        "last_used": None,
        "in_flight": 0,
        "queue_depth": 0,
        "pinned": False,
        "pid": None,
        "restarts": 0,
        "error": None,
    }
    return {**base, **fields}


@pytest.mark.parametrize(
    ("n", "shown"),
    [(None, "-"), (0, "-"), (512, "512B"), (3 * GIB, "3.0GiB"), (1536 * 1024**2, "1.5GiB")],
)
def test_sizes_are_iec_and_nothing_is_a_dash(n: int | None, shown: str) -> None:
    assert render.size(n) == shown


@pytest.mark.parametrize(
    ("seconds_ago", "shown"),
    [(0, "0s ago"), (12.7, "12s ago"), (59, "59s ago"), (180, "3m ago"), (7300, "2h ago")],
)
def test_ago_uses_the_largest_whole_unit(seconds_ago: float, shown: str) -> None:
    assert render.ago(NOW - seconds_ago, NOW) == shown


def test_ago_of_never_is_a_dash_and_of_the_future_is_now() -> None:
    assert render.ago(None, NOW) == "-"
    assert render.ago(NOW + 5, NOW) == "0s ago"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.4, "0s"), (12, "12s"), (185, "3m5s"), (3600, "1h"), (7805, "2h10m"), (3 * 86400, "3d")],
)
def test_span_shows_at_most_two_units(seconds: float, shown: str) -> None:
    assert render.span(seconds) == shown


def test_table_aligns_columns_without_trailing_blanks() -> None:
    text = render.table(("A", "LONGER"), [["xyz", "1"], ["w", ""]])
    assert text.splitlines() == ["A    LONGER", "xyz  1", "w"]


def test_ps_table_has_the_documented_columns_and_one_row_per_model() -> None:
    ready = model(
        name="a",
        state="ready",
        reserved_bytes={"cpu0": 3 * GIB},
        measured_bytes=36 * 1024**2,
        last_used=NOW - 12,
        in_flight=2,
        pid=1234,
    )
    lines = render.ps_table([ready, model(name="b")], NOW).splitlines()
    assert lines[0].split() == list(render.PS_COLUMNS)
    assert lines[1].split() == [
        "a",
        "ready",
        "cpu0",
        "3.0GiB",
        "36.0MiB",
        "1234",
        "-",
        "12s",
        "ago",
        "2",
    ]
    assert lines[2].split() == ["b", "stopped", "cpu0", "-", "-", "-", "-", "-", "0"]
    # Every row's cells start under their header.
    assert lines[1].index("ready") == lines[0].index("STATE")
    assert lines[2].rindex("0") == lines[0].index("IN-FLIGHT")


def test_ps_shows_reservation_per_device_of_a_multi_device_model() -> None:
    row = render.ps_row(
        model(state="ready", devices=["0", "1"], reserved_bytes={"0": 20 * GIB, "1": 20 * GIB}),
        NOW,
    )
    assert row[2:4] == ["0,1", "20.0GiB"]


def test_uptime_fills_in_once_the_view_has_state_since() -> None:
    assert render.uptime(model(state="ready"), NOW) == "-"
    assert render.uptime(model(state="ready", state_since=NOW - 185), NOW) == "3m5s"
    assert render.uptime(model(state="stopped", state_since=NOW - 185), NOW) == "-"


def test_model_line_says_state_pid_and_pin() -> None:
    assert render.model_line(model(state="ready", pid=1234)) == "tiny-chat: ready (pid 1234)"
    assert render.model_line(model(pinned=True)) == "tiny-chat: stopped, pinned"
    failed = model(state="failed", error="engine exited with status 1")
    assert render.model_line(failed) == "tiny-chat: failed: engine exited with status 1"


def test_status_lines_name_version_config_devices_and_states() -> None:
    status = {
        "version": "0.1.0",
        "pid": 42,
        "uptime_seconds": 3725.2,
        "config_path": "/etc/vllmd/vllmd.toml",
        "devices": [
            {
                "name": "0",
                "kind": "gpu",
                "total_bytes": 24 * GIB,
                "reserved_bytes": 3 * GIB,
                "used_bytes": 4 * GIB,
                "free_bytes": 20 * GIB,
                "up": False,
            }
        ],
        "models_by_state": {"stopped": 2, "ready": 1},
        "alerts_firing": 2,
    }
    assert render.status_lines(status) == [
        "vllmd 0.1.0, pid 42, up 1h2m",
        "config: /etc/vllmd/vllmd.toml",
        "device 0 (gpu): total 24.0GiB, reserved 3.0GiB, used 4.0GiB, free 20.0GiB, DOWN",
        "models: 1 ready, 2 stopped",
        "alerts firing: 2",
    ]


def test_devices_table_lists_each_models_reservation() -> None:
    device = {
        "name": "cpu0",
        "kind": "cpu",
        "total_bytes": 64 * GIB,
        "reserved_bytes": 3 * GIB,
        "used_bytes": 0,
        "free_bytes": 61 * GIB,
        "up": True,
        "models": [{"name": "a", "reserved_bytes": 3 * GIB}],
    }
    lines = render.devices_table([device]).splitlines()
    assert lines[1].split() == [
        "cpu0",
        "cpu",
        "64.0GiB",
        "3.0GiB",
        "-",
        "61.0GiB",
        "yes",
        "a=3.0GiB",
    ]


def test_event_line_has_local_time_id_kind_model_and_fields() -> None:
    event = {
        "id": 7,
        "time": datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC).timestamp(),
        "kind": "state",
        "model": "a",
        "old": "starting",
        "new": "ready",
        "reason": "wake failed: out of memory",
    }
    line = render.event_line(event, timezone(timedelta(hours=1)))
    assert line == (
        '2026-12-01T11:00:05+01:00 #7 state a old=starting new=ready reason="wake failed: out of '
        'memory"'
    )


def test_event_line_of_a_host_event_shows_a_dash_for_the_model() -> None:
    line = render.event_line({"id": 1, "time": 0.0, "kind": "control", "model": None}, UTC)
    assert line == "1970-01-01T00:00:00+00:00 #1 control -"


def test_reload_summary_lists_the_changed_keys_and_says_nothing_changed_only_then() -> None:
    """A reload that changed only keys outside the models (api_keys, queue settings) says which,
    not "nothing changed"."""
    empty = {"reloaded": True, "added": [], "removed": [], "restarted": [], "live": []}
    keys_only = {**empty, "changed": ["gateway.api_keys", "gateway.max_queue"]}
    both = {
        **empty,
        "restarted": ["a"],
        "live": ["b"],
        "changed": ["models.a.args", "models.b.pinned"],
    }
    assert render.reload_summary({**empty, "changed": []}) == "reloaded: nothing changed"
    assert render.reload_summary(keys_only) == "reloaded: keys gateway.api_keys, gateway.max_queue"
    assert render.reload_summary(both) == (
        "reloaded: restarted a; changed b; keys models.a.args, models.b.pinned"
    )


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("42", "42"),
        ("10m", "2026-12-01T09:50:00+00:00"),
        ("2026-12-01T08:00:00Z", "2026-12-01T08:00:00+00:00"),
        ("yesterday", "yesterday"),  # the server says what is wrong with it
    ],
)
def test_since_takes_an_id_a_time_or_a_duration_ago(given: str, sent: str) -> None:
    assert since_param(given, datetime(2026, 12, 1, 10, 0, tzinfo=UTC)) == sent


def test_since_a_time_without_zone_is_local() -> None:
    sent = datetime.fromisoformat(since_param("2026-12-01T08:00:00", datetime.now(UTC)))
    assert sent.tzinfo is not None
    assert sent.replace(tzinfo=None) == datetime(2026, 12, 1, 8, 0)


def test_unreachable_message_names_the_socket_and_why() -> None:
    socket = Path("/run/vllmd/control.sock")
    missing = unreachable_message(socket, FileNotFoundError(2, "No such file or directory"))
    assert str(socket) in missing
    assert "no such socket" in missing
    assert "systemctl status vllmd" in missing
    assert "permission denied" in unreachable_message(socket, PermissionError(13, "denied"))


def test_devices_table_says_where_nvml_cannot_attribute_memory() -> None:
    gpu = {"name": "0", "kind": "gpu", "total_bytes": 80 * GIB, "up": True, "models": []}
    unseen = {"why": "pid_namespace", "cause": "NVML lists none of the engine's pids", "fix": "F"}
    lines = render.devices_table([gpu, {**gpu, "name": "1", "pids_unseen": unseen}]).splitlines()
    assert len(lines) == 4
    assert lines[3] == "1: NVML lists none of the engine's pids; budgeted by reservation (fix: F)"
