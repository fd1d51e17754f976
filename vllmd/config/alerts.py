"""[alerts] and [[alerts.rules]]: the user's rules merged over the default rules by name."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from vllmd.config.models import is_gpu_index
from vllmd.config.reader import Table
from vllmd.config.schema import AlertRule, AlertsConfig, DeviceConfig, ModelConfig
from vllmd.units import parse_size

# The closed list of docs/design.md "Alerts"; the prefix says what a rule's alerts are keyed by.
SIGNALS = (
    "device_memory_used_ratio",
    "device_utilization_ratio",
    "device_temperature_celsius",
    "device_memory_foreign_bytes",
    "model_error_ratio",
    "model_ttfb_p99_seconds",
    "model_queue_depth",
    "model_restarts",
    "model_failed",
    "model_memory_over_reservation_bytes",
    "model_kv_cache_usage_ratio",
    "evictions_rate",
    "state_store_degraded",
)
OPS = (">", ">=", "<", "<=", "==", "!=")


def _rule(name: str, signal: str, op: str, threshold: float, summary: str, **kw: Any) -> AlertRule:
    return AlertRule(
        name, signal, op, threshold, annotations=MappingProxyType({"summary": summary}), **kw
    )


DEFAULT_RULES: tuple[AlertRule, ...] = (
    _rule("VllmdModelFailed", "model_failed", "==", 1, "Model failed: too many restarts",
          severity="critical"),
    _rule("VllmdModelRestarts", "model_restarts", ">=", 3, "Model restarted often",
          window=600.0),
    _rule("VllmdModelErrors", "model_error_ratio", ">", 0.05, "Model answers with errors",
          for_=300.0, window=300.0, min_requests=20),
    _rule("VllmdModelSlowFirstByte", "model_ttfb_p99_seconds", ">", 10, "Model is slow to answer",
          for_=300.0, window=300.0),
    _rule("VllmdModelOverReservation", "model_memory_over_reservation_bytes", ">", 0,
          "Model uses more memory than reserved", for_=120.0),
    _rule("VllmdForeignDeviceMemory", "device_memory_foreign_bytes", ">", 1024**3,
          "Processes vllmd does not own use device memory", for_=300.0),
    _rule("VllmdEvictionThrash", "evictions_rate", ">", 6, "Models are evicted too often",
          for_=600.0),
    _rule("VllmdStateStoreDegraded", "state_store_degraded", "==", 1,
          "State store is degraded (locked, corrupt or full)"),
)  # fmt: skip


def parse_alerts(
    table: Table,
    models: Mapping[str, ModelConfig],
    devices: Mapping[str, DeviceConfig],
) -> AlertsConfig:
    d = AlertsConfig()
    config = AlertsConfig(
        enabled=table.flag("enabled", d.enabled),
        interval=table.duration("interval", d.interval),
        alertmanager=_urls(table, "alertmanager"),
        webhooks=_urls(table, "webhooks"),
        resend=table.duration("resend", d.resend),
        labels=_labels(table),
        external_url=table.text("external_url", d.external_url),
    )
    if config.external_url and urlsplit(config.external_url).scheme not in ("http", "https"):
        table.problems.append(f"{table.key('external_url')}: not an http:// or https:// URL")
    rules = {rule.name: rule for rule in DEFAULT_RULES}
    raw_rules: list[dict[str, Any]] = table.read(
        "rules", [], _list_of_tables, "an array of tables ([[alerts.rules]])"
    )
    named: set[str] = set()
    for i, raw in enumerate(raw_rules):
        rule_table = Table(raw, f"{table.key('rules')}[{i}]", table.problems)
        rule = _parse_rule(rule_table, rules, models, devices)
        rule_table.finish()
        if rule is None:
            continue
        if rule.name in named:
            rule_table.problem("name", f"{json.dumps(rule.name)} is used by another rule")
        named.add(rule.name)
        rules[rule.name] = rule
    enabled = tuple(rule for rule in rules.values() if rule.enabled)
    return replace(config, rules=enabled)


def _list_of_tables(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise TypeError
    return value


def _urls(table: Table, name: str) -> tuple[str, ...]:
    urls = table.strings(name, secret=True)  # URLs may carry user:password
    for i, url in enumerate(urls):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or not _usable(url):
            table.problems.append(f"{table.key(name)}[{i}]: not a usable http:// or https:// URL")
    return urls


def _usable(url: str) -> bool:
    """Whether the HTTP client can send to `url` (a host it can encode, a port in range)."""
    import httpx  # only for a config that names receivers: not at every start

    try:
        parsed = httpx.URL(url)
        return bool(parsed.host) and (parsed.port is None or 0 < parsed.port < 65536)
    except Exception:  # httpx.InvalidURL, idna errors, ...
        return False


LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
RESERVED_LABELS = frozenset({"alertname", "alertstate"})


def _labels(table: Table) -> Mapping[str, str]:
    """`labels` of an alert: Prometheus label names (Alertmanager refuses a whole batch with
    one bad name), none it sets itself."""
    labels = table.mapping("labels")
    for name in labels:
        if not LABEL_NAME.fullmatch(name) or name.startswith("__"):
            table.problems.append(f"{table.key('labels')}.{name}: not a Prometheus label name")
        elif name in RESERVED_LABELS:
            table.problems.append(f"{table.key('labels')}.{name}: set by vllmd itself")
    return labels


def _parse_rule(
    table: Table,
    rules: Mapping[str, AlertRule],
    models: Mapping[str, ModelConfig],
    devices: Mapping[str, DeviceConfig],
) -> AlertRule | None:
    if not table.require("name"):
        return None
    name = table.text("name", "")
    if not name:
        table.problem("name", "must not be empty")
        return None
    base = rules.get(name)
    # A rule that overrides a default inherits every key it does not set; a new one must say
    # what it watches.
    if base is None and not all([table.require(k) for k in ("signal", "op", "threshold")]):
        return None
    base = base or AlertRule(name=name, signal="", op=">", threshold=0.0)
    signal = table.choice("signal", base.signal, SIGNALS)
    model = table.text("model", base.model)
    device = table.text("device", base.device)
    if model and model not in models:
        table.problem("model", f"{json.dumps(model)} is not a configured model")
    if device and device not in devices and not is_gpu_index(device):
        table.problem("device", f"{json.dumps(device)} is not a known device")
    if model and not signal.startswith("model_"):
        table.problem("model", f'applies only to model_* signals, not "{signal}"')
    if device and not signal.startswith("device_"):
        table.problem("device", f'applies only to device_* signals, not "{signal}"')
    return AlertRule(
        name=name,
        signal=signal,
        op=table.choice("op", base.op, OPS),
        threshold=table.read(
            "threshold", base.threshold, lambda v: _threshold(v, signal), "a number"
        ),
        for_=table.duration("for", base.for_),
        window=table.duration("window", base.window),
        min_requests=table.integer("min_requests", base.min_requests, minimum=0),
        severity=table.text("severity", base.severity),
        model=model,
        device=device,
        labels=MappingProxyType({**base.labels, **_labels(table)}),
        annotations=MappingProxyType({**base.annotations, **table.mapping("annotations")}),
        enabled=table.flag("enabled", base.enabled),
    )


def _threshold(value: Any, signal: str) -> float:
    # Byte signals read better as sizes: threshold = "1GiB".
    if isinstance(value, str) and signal.endswith("_bytes"):
        return float(parse_size(value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError
    return float(value)
