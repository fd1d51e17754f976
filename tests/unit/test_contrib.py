"""contrib/: the Grafana dashboard names only metrics vllmd exports; the Prometheus and
Alertmanager examples pass their own tools' checks (promtool, amtool: Debian's `prometheus`
and `prometheus-alertmanager`; missing tools fail these tests, they are not skipped)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_metrics import FakeSupervisor, account, gpu, status
from vllmd.events import EventBus, Kind
from vllmd.instance.states import InstanceState
from vllmd.metrics import Metrics

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
DASHBOARD = CONTRIB / "grafana" / "vllmd.json"
# Registered with `Metrics.registry` by the alert engine (vllmd/alerts), not by vllmd.metrics.
REGISTERED_ELSEWHERE = {"vllmd_alerts", "vllmd_alert_notifications_total"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported(tmp_path: Path) -> set[str]:
    """Every series name a vllmd with some state and traffic exports."""
    metrics = Metrics(CollectorRegistry())
    metrics.watch(
        FakeSupervisor(
            [status(tmp_path, "a", InstanceState.READY, measured_bytes=1, pid=1, last_used=1.0)],
            accounts=[account("0")],
            devices={"0": gpu("0")},
        )
    )
    bus = EventBus()
    metrics.count_events(bus)
    metrics.watch_store(lambda: False)
    bus.emit(Kind.STATE, "a", old="waking", new="ready", wake_seconds=1.0)
    bus.emit(Kind.STATE, "a", old="starting", new="ready", load_seconds=1.0)
    metrics.request("a", "/v1/completions", 200, 0.1)
    metrics.queued("a", 0.1)
    metrics.first_byte("a", 0.1)
    body, _ = metrics.exposition()
    names: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
        names.update(s.name for s in family.samples)
    return names


def queries(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        query = node.get("query")
        if isinstance(query, dict) and isinstance(query.get("query"), str):
            found.append(query["query"])
        return found + [q for value in node.values() for q in queries(value)]
    if isinstance(node, list):
        return [q for value in node for q in queries(value)]
    return []


def test_dashboard_is_an_exported_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("state", "memory", "requests/s", "p99", "queue", "evictions", "first byte"):
        assert topic in titles, topic
    assert "alerts" in titles


def test_dashboard_queries_name_only_metrics_vllmd_exports(tmp_path: Path) -> None:
    names = exported(tmp_path) | REGISTERED_ELSEWHERE
    used = {
        name
        for query in queries(json.loads(DASHBOARD.read_text()))
        for name in re.findall(r"\bvllmd_[a-z_]+", query)
    }
    assert len(used) > 20
    unknown = used - names
    assert not unknown, f"the dashboard queries metrics vllmd does not export: {sorted(unknown)}"


def test_exported_histograms_have_their_suffixed_series(tmp_path: Path) -> None:
    names = exported(tmp_path)
    for suffix in HISTOGRAM_SUFFIXES:
        assert f"vllmd_request_duration_seconds{suffix}" in names


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, (
        f"{name} is missing: apt-get install prometheus prometheus-alertmanager"
    )
    return path


def check(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_config_passes_promtool() -> None:
    check(tool("promtool"), "check", "config", str(CONTRIB / "prometheus" / "prometheus.yml"))


def test_prometheus_rules_pass_promtool() -> None:
    check(tool("promtool"), "check", "rules", str(CONTRIB / "prometheus" / "vllmd-rules.yml"))


def test_rules_name_only_metrics_vllmd_exports(tmp_path: Path) -> None:
    names = exported(tmp_path)
    text = (CONTRIB / "prometheus" / "vllmd-rules.yml").read_text()
    used = set(re.findall(r"\bvllmd_[a-z_]+", text))
    assert used and used <= names, sorted(used - names)


def test_alertmanager_config_passes_amtool() -> None:
    check(tool("amtool"), "check-config", str(CONTRIB / "alertmanager" / "alertmanager.yml"))
