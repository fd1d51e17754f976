"""How `vllmctl` shows the control API's JSON to a person: pure functions, `now` passed in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any

from vllmd.units import format_size

NONE = "-"
PS_COLUMNS = (
    "NAME",
    "STATE",
    "DEVICES",
    "RESERVED",
    "USED",
    "PID",
    "UPTIME",
    "LAST-USED",
    "IN-FLIGHT",
)
# The state names (as the control API spells them) whose UPTIME column is shown: an engine
# is up and serving or resting. The CLI reads JSON, not vllmd's state type, so the set is its.
UPTIME_SHOWN = frozenset({"ready", "draining", "sleeping", "waking"})
# Those whose measured footprint is what the engine uses now (the daemon's MEASURED set): the
# view keeps the figure of the last start after a stop, and a sleeping engine's is its awake one.
USED_SHOWN = frozenset({"ready", "draining"})


def size(n: int | None) -> str:
    """Bytes for humans ("3.0GiB"); "-" for none or zero (nothing held, nothing measured)."""
    return format_size(n) if n else NONE


def span(seconds: float) -> str:
    """A coarse duration, two units at most: "12s", "3m5s", "2h10m", "4d3h"."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    for i, (value, unit) in enumerate(units):
        if value or unit == "s":
            first = f"{value}{unit}"
            if i + 1 < len(units) and units[i + 1][0]:
                return first + f"{units[i + 1][0]}{units[i + 1][1]}"
            return first
    raise AssertionError("unreachable")  # pragma: no cover - the seconds unit always returns


def ago(when: float | None, now: float) -> str:
    """How long ago `when` (unix seconds) was, in its largest unit: "12s ago", "3m ago"."""
    if when is None:
        return NONE
    seconds = max(0, int(now - when))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit} ago"
    return f"{seconds}s ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def reserved(model: Mapping[str, Any]) -> int:
    """What the model holds per device (as the config's `memory` is per device)."""
    held = model.get("reserved_bytes") or {}
    return max(held.values(), default=0)


def uptime(model: Mapping[str, Any], now: float) -> str:
    # The model view has no `state_since` yet; once it does, the column fills in.
    since = model.get("state_since")
    if since is None or model.get("state") not in UPTIME_SHOWN:
        return NONE
    return span(now - float(since))


def used(model: Mapping[str, Any]) -> str:
    """USED: the footprint now, so none without an engine running awake."""
    if model.get("state") not in USED_SHOWN or not model.get("pid"):
        return NONE
    return size(model.get("measured_bytes"))


def ps_row(model: Mapping[str, Any], now: float) -> list[str]:
    pid = model.get("pid")
    return [
        str(model["name"]),
        str(model["state"]),
        ",".join(model.get("devices") or []) or NONE,
        size(reserved(model)),
        used(model),
        str(pid) if pid else NONE,
        uptime(model, now),
        ago(model.get("last_used"), now),
        str(model.get("in_flight", 0)),
    ]


def ps_table(models: Sequence[Mapping[str, Any]], now: float) -> str:
    """`vllmctl ps`: one row per model, in the API's order."""
    return table(PS_COLUMNS, [ps_row(m, now) for m in models])


def model_line(model: Mapping[str, Any]) -> str:
    """One line saying where a model is after a verb: "tiny-chat: ready (pid 1234)"."""
    line = f"{model['name']}: {model['state']}"
    if model.get("pid"):
        line += f" (pid {model['pid']})"
    if model.get("pinned"):
        line += ", pinned"
    if model.get("error") and model.get("state") == "failed":
        line += f": {model['error']}"
    return line


def device_line(device: Mapping[str, Any]) -> str:
    up = "up" if device.get("up") else "DOWN"
    return (
        f"device {device['name']} ({device['kind']}): total {size(device.get('total_bytes'))}, "
        f"reserved {size(device.get('reserved_bytes'))}, used {size(device.get('used_bytes'))}, "
        f"free {size(device.get('free_bytes'))}, {up}"
    )


def status_lines(status: Mapping[str, Any]) -> list[str]:
    """`vllmctl status`: the daemon, its config, each device, models counted by state."""
    by_state: Mapping[str, int] = status.get("models_by_state") or {}
    counts = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items())) or "none"
    return [
        f"vllmd {status['version']}, pid {status['pid']}, up {span(status['uptime_seconds'])}",
        f"config: {status.get('config_path') or NONE}",
        *(device_line(d) for d in status.get("devices") or []),
        f"models: {counts}",
        f"alerts firing: {status.get('alerts_firing', 0)}",
    ]


def reload_summary(body: Mapping[str, Any]) -> str:
    """`vllmctl reload`: what the reload did, in one line."""
    kinds = (("added", "added"), ("removed", "removed"), ("restarted", "restarted"))
    parts = [f"{what} {', '.join(body[key])}" for what, key in kinds if body.get(key)]
    if body.get("live"):
        parts.append(f"changed {', '.join(body['live'])}")
    if body.get("changed"):  # every changed key path, never a value
        parts.append(f"keys {', '.join(body['changed'])}")
    return "reloaded: " + ("; ".join(parts) if parts else "nothing changed")


def alerts_table(alerts: Sequence[Mapping[str, Any]]) -> str:
    """`vllmctl alerts`: one row per pending or firing alert."""
    headers = ("ALERTNAME", "STATE", "SEVERITY", "ON", "VALUE", "SINCE", "SUMMARY")
    rows = [
        [
            str(a["labels"].get("alertname", a.get("name", ""))),
            str(a["state"]),
            str(a["labels"].get("severity", NONE)),
            str(a["labels"].get("model") or a["labels"].get("device") or NONE),
            NONE if a.get("value") is None else f"{a['value']:g}",
            str(a.get("startsAt") or a.get("activeAt") or NONE),
            str((a.get("annotations") or {}).get("summary", "")),
        ]
        for a in alerts
    ]
    return table(headers, rows) if rows else "no alerts pending or firing"


def devices_table(devices: Sequence[Mapping[str, Any]]) -> str:
    """`vllmctl devices`: one row per device, with what each model reserves on it."""
    headers = ("NAME", "KIND", "TOTAL", "RESERVED", "USED", "FREE", "UP", "MODELS")
    rows = [
        [
            str(d["name"]),
            str(d["kind"]),
            size(d.get("total_bytes")),
            size(d.get("reserved_bytes")),
            size(d.get("used_bytes")),
            size(d.get("free_bytes")),
            "yes" if d.get("up") else "no",
            ",".join(f"{m['name']}={size(m['reserved_bytes'])}" for m in d.get("models") or [])
            or NONE,
        ]
        for d in devices
    ]
    notes = [
        f"{d['name']}: {unseen['cause']}; budgeted by reservation (fix: {unseen['fix']})"
        for d in devices
        if (unseen := d.get("pids_unseen"))
    ]
    return "\n".join([table(headers, rows), *notes])


def event_line(event: Mapping[str, Any], tz: tzinfo | None = None) -> str:
    """One event: local ISO time, id, kind, model, then its own fields as key=value."""
    when = datetime.fromtimestamp(float(event["time"]), tz).astimezone(tz)
    fields = " ".join(
        f"{key}={_quoted(_value(value, key.endswith('_bytes')))}"
        for key, value in event.items()
        if key not in ("id", "time", "kind", "model")
    )
    head = f"{when.isoformat(timespec='seconds')} #{event['id']} {event['kind']} "
    return (head + str(event.get("model") or NONE) + (" " + fields if fields else "")).rstrip()


def _value(value: object, is_bytes: bool) -> str:
    """A field's value as text: a map as `k=v,k=v`, a list as `a,b`, byte counts (a `_bytes`
    field's numbers) as sizes; never a Python repr."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return ",".join(f"{k}={_value(v, is_bytes)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(_value(v, is_bytes) for v in value)
    if is_bytes and isinstance(value, int) and not isinstance(value, bool):
        return format_size(value)
    return str(value)


def _quoted(text: str) -> str:
    return f'"{text}"' if not text or any(c.isspace() for c in text) else text


def plan_text(plan: Mapping[str, Any]) -> str:
    """`vllmctl plan` and `vllmd check-config --plan`: per device, each model's memory in its
    parts, which models fit together, then the warnings."""
    headers = ("MODEL", "MEMORY", "SOURCE", "WEIGHTS", "KV", "WORKSPACE", "OVERHEAD", "MEASURED")
    blocks = []
    for d in plan["devices"]:
        usable = d.get("usable_bytes")
        room = f"{size(d.get('total_bytes'))}, {size(usable)} after the headroom"
        rows = []
        for m in d["models"]:
            est = m.get("estimate") or {}
            kv = NONE
            if est:
                kv = f"{size(est['kv_bytes'])} ({est['kv_sequences']}x{est['max_model_len']})"
            rows.append(
                [
                    str(m["name"]),
                    size(m.get("memory_bytes")),
                    str(m["source"]),
                    size(est.get("weights_bytes")),
                    kv,
                    size(est.get("workspace_bytes")),
                    size(est.get("overhead_bytes")),
                    size(m.get("measured_bytes")),
                ]
            )
        pairs = ", ".join("+".join(pair) for pair in d["together"]) or NONE
        fit = "yes" if d["all_fit"] else "no" if usable is not None else "unknown"
        together = f"together: {pairs}; all at once: {fit}"
        blocks.append(
            "\n".join([f"{d['name']} ({d['kind']}): {room}", table(headers, rows), together])
        )
    unsized = list(
        dict.fromkeys(
            f"{m['name']}: not sized yet: {m['unsized']}"
            for d in plan["devices"]
            for m in d["models"]
            if m.get("unsized")
        )
    )
    warnings = [f"warning: {w}" for w in plan["warnings"]]
    return "\n\n".join(blocks + (["\n".join(unsized + warnings)] if unsized or warnings else []))
