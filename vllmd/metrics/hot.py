"""Counters and histograms for the hot path, rendered straight to text.

prometheus_client's own take a lock and walk their buckets in Python on every observation,
and a scrape builds a Sample per bucket and re-validates every label: too slow for every
request and every scrape of a hundred models on a busy host. These keep plain numbers per
label set and each series' text prefix, built once when the label set is first seen, so an
observation is a bisect and two additions and a scrape is string joins. `collect()` still
yields ordinary metric families (for `registry.get_sample_value` and any other reader).

Not thread-safe by design: every update and scrape runs on the daemon's event loop.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

INF = float("inf")


def number(value: float) -> str:
    """A sample value as the text format writes it."""
    if value == INF:
        return "+Inf"
    if value == -INF:
        return "-Inf"
    if value != value:
        return "NaN"
    return repr(float(value))


def escape_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """`a="x",b="y"` (empty for no labels)."""
    return ",".join(f'{n}="{escape_value(v)}"' for n, v in zip(names, values, strict=True))


def _header(name: str, doc: str, kind: str) -> str:
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


class CounterChild:
    __slots__ = ("line", "value")

    def __init__(self, line: str) -> None:
        self.line = line  # `name{labels} `
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("_bounds", "count", "counts", "lines", "sum")

    def __init__(self, bounds: tuple[float, ...], lines: tuple[str, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0
        self.lines = lines  # each bucket's `name_bucket{..,le=".."} `, then _sum's, _count's

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value
        self.count += 1


class HotCounter:
    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name = name  # without `_total`
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], CounterChild] = {}

    def labels(self, *values: str) -> CounterChild:
        child = self.children.get(values)
        if child is None:
            text = label_text(self.labelnames, values)
            child = self.children[values] = CounterChild(f"{self.name}_total{{{text}}} ")
        return child

    def render(self, out: list[str]) -> None:
        out.append(_header(self.name + "_total", self.doc, "counter"))
        out.extend(f"{c.line}{number(c.value)}\n" for c in self.children.values())

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(values, child.value)
        return family


class HotHistogram:
    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        bounds = tuple(float(b) for b in buckets)
        self.bounds = bounds if bounds[-1] == INF else (*bounds, INF)
        self._les = tuple(number(b) for b in self.bounds)
        self.children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, *values: str) -> HistogramChild:
        child = self.children.get(values)
        if child is None:
            text = label_text(self.labelnames, values)
            sep = "," if text else ""
            lines = (
                *(f'{self.name}_bucket{{{text}{sep}le="{le}"}} ' for le in self._les),
                f"{self.name}_sum{{{text}}} " if text else f"{self.name}_sum ",
                f"{self.name}_count{{{text}}} " if text else f"{self.name}_count ",
            )
            child = self.children[values] = HistogramChild(self.bounds, lines)
        return child

    def render(self, out: list[str]) -> None:
        out.append(_header(self.name, self.doc, "histogram"))
        for child in self.children.values():
            lines = child.lines
            total = 0
            for i, n in enumerate(child.counts):
                total += n
                out.append(f"{lines[i]}{total}\n")
            out.append(f"{lines[-2]}{number(child.sum)}\n")
            out.append(f"{lines[-1]}{child.count}\n")

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self.children.items():
            total, buckets = 0, []
            for le, n in zip(self._les, child.counts, strict=True):
                total += n
                buckets.append((le, float(total)))
            family.add_metric(list(values), buckets, child.sum)
        return family


class Rows:
    """A gauge or counter family read at scrape time: rows of label values and a value.

    `cache` (kept by the collector across scrapes) holds each label set's text: the label
    sets are a closed set (models, states, devices), the text is built once per set."""

    __slots__ = ("_cache", "doc", "kind", "labelnames", "name", "rows")

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str],
        kind: str = "gauge",
        cache: dict[tuple[str, ...], str] | None = None,
    ) -> None:
        self.name = name  # a counter's without `_total`
        self.doc = doc
        self.kind = kind
        self.labelnames = tuple(labelnames)
        self.rows: list[tuple[tuple[str, ...], float]] = []
        self._cache = cache if cache is not None else {}

    def add(self, values: Sequence[str], value: float) -> None:
        self.rows.append((tuple(values), value))

    def render(self, out: list[str]) -> None:
        name = self.name + "_total" if self.kind == "counter" else self.name
        out.append(_header(name, self.doc, self.kind))
        cache = self._cache
        for values, value in self.rows:
            prefix = cache.get(values)
            if prefix is None:
                labels = label_text(self.labelnames, values)
                prefix = cache[values] = f"{name}{{{labels}}} " if labels else f"{name} "
            out.append(f"{prefix}{number(value)}\n")

    def family(self) -> Metric:
        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = kind(self.name, self.doc, labels=self.labelnames)
        for values, value in self.rows:
            family.add_metric(values, value)
        return family


Family = HotCounter | HotHistogram | Rows


class TextCollector(Collector):
    """Families that write their own text. `Metrics.exposition` renders them itself and mutes
    them meanwhile (`collect()` yields nothing then), so they are not written twice; for
    every other reader `collect()` yields ordinary metric families."""

    _muted = False
    _caches: dict[str, dict[tuple[str, ...], str]] | None = None

    def rows(self, name: str, doc: str, labelnames: Sequence[str], kind: str = "gauge") -> Rows:
        """A `Rows` family whose label texts this collector keeps across scrapes."""
        if self._caches is None:
            self._caches = {}
        return Rows(name, doc, labelnames, kind, self._caches.setdefault(name, {}))

    def families(self) -> Iterable[Family]:
        raise NotImplementedError

    @contextmanager
    def muted(self) -> Iterator[None]:
        """While the block runs, `collect()` yields nothing (its owner writes the text)."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False

    def collect(self) -> Iterator[Metric]:
        if not self._muted:
            yield from (f.family() for f in self.families())

    def render(self) -> str:
        out: list[str] = []
        for family in self.families():
            family.render(out)
        return "".join(out)


class HotCollector(TextCollector):
    """The hot path's families."""

    def __init__(self, families: Sequence[HotCounter | HotHistogram]) -> None:
        self._families = tuple(families)

    def families(self) -> Iterable[Family]:
        return self._families
