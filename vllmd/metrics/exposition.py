"""Prometheus text exposition of a registry, without the `_created` series, fast.

prometheus_client writes every counter's and histogram's creation time as an extra
`<name>_created` gauge family; Prometheus's text format has no use for them (they double the
families of a scrape). Its only switch is process-global (`disable_created_metrics`), so they
are dropped here, per registry, at render time. Its `generate_latest` also re-validates every
label name of every sample (regexes); the names were validated when the families were made,
so this writes them as they are (values are still escaped).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from vllmd.metrics.hot import escape_value, number

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# OpenMetrics types written in Prometheus's text format under another name (and suffix).
_TYPE_NAMES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}
_TYPE_NAMES |= {"summary": "summary", "info": "gauge", "unknown": "untyped"}
_SUFFIX = {"counter": "_total", "info": "_info"}


def render_families(metrics: Iterable[Metric]) -> str:
    out: list[str] = []
    for metric in metrics:
        kind = _TYPE_NAMES.get(metric.type)
        if kind is None:  # stateset, gaugehistogram: rare; prometheus_client's own writer
            out.append(generate_latest(_One(metric)).decode())
            continue
        name = metric.name + _SUFFIX.get(metric.type, "")
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        created = metric.name + "_created"
        for s in metric.samples:
            if s.name == created:
                continue
            value = number(s.value)
            stamp = "" if s.timestamp is None else f" {int(float(s.timestamp) * 1000)}"
            if s.labels:
                labels = ",".join(f'{k}="{escape_value(v)}"' for k, v in s.labels.items())
                out.append(f"{s.name}{{{labels}}} {value}{stamp}\n")
            else:
                out.append(f"{s.name} {value}{stamp}\n")
    return "".join(out)


class _One(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self._metric]
