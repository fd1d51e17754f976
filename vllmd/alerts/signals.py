"""The signals alert rules watch (docs/design.md "Alerts", a closed list), computed at
evaluation time.

Request signals come from the gateway's own observations (`Observations`: per-second ring
buffers per model, O(1) per request); restarts and evictions from the event bus (a
synchronous listener); model and device state is read from the supervisor through injected
callables when a rule is evaluated, so nothing is copied in the background.

Not computed yet (their rules never hold): `model_kv_cache_usage_ratio` (needs the engines'
`vllm:` metrics) and `state_store_degraded` (until the state store exists; pass `degraded`).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property

from vllmd.alerts.rules import LabelSet
from vllmd.config.schema import AlertRule
from vllmd.devices import DeviceSnapshot
from vllmd.events import Event, EventBus, Kind
from vllmd.instance.states import MEASURED, InstanceState
from vllmd.instance.status import ModelStatus
from vllmd.placement.ledger import DeviceAccount
from vllmd.placement.scheduler import over_reservation

HORIZON = 3600  # seconds of request history kept; longer windows are cut to it
# Time-to-first-byte buckets: upper bounds from 1 ms to ~10 min, a factor 2^(1/16) (4.4 %)
# apart, so an interpolated p99 is off by at most that much near a threshold (p99 is
# interpolated inside a bucket, as histogram_quantile does).
TTFB_BOUNDS: tuple[float, ...] = tuple(0.001 * 2 ** (i / 16) for i in range(309))
_B = len(TTFB_BOUNDS) + 1  # + the overflow bucket
HIST_SLOT = 10  # seconds per slot of the TTFB histograms (finer buckets, coarser time)


class _Ring:
    """One model's requests over the last `size` seconds, one slot per second."""

    __slots__ = ("errors", "hist", "hsize", "hstamp", "size", "stamp", "total")

    def __init__(self, size: int) -> None:
        self.size = size
        self.stamp = [-1] * size  # which second each slot holds
        self.total = [0] * size
        self.errors = [0] * size
        self.hsize = max(1, size // HIST_SLOT)
        self.hstamp = [-1] * self.hsize  # which HIST_SLOT-second span each histogram holds
        self.hist = [0] * (self.hsize * _B)  # TTFB bucket counts, _B per histogram slot

    def slot(self, second: int) -> int:
        i = second % self.size
        if self.stamp[i] != second:  # a slot from `size` seconds ago: reuse it
            self.stamp[i] = second
            self.total[i] = self.errors[i] = 0
        return i

    def hslot(self, second: int) -> int:
        span = second // HIST_SLOT
        i = span % self.hsize
        if self.hstamp[i] != span:
            self.hstamp[i] = span
            self.hist[i * _B : (i + 1) * _B] = _ZEROS
        return i

    def hslots(self, now: float, window: float) -> Iterable[int]:
        """The histogram slots covering the `window` seconds up to `now`."""
        last = int(now) // HIST_SLOT
        span = min(self.hsize, max(1, math.ceil(window / HIST_SLOT)))
        for each in range(last - span + 1, last + 1):
            i = each % self.hsize
            if self.hstamp[i] == each:
                yield i

    def seconds(self, now: float, window: float) -> Iterable[int]:
        """The slots of the `window` seconds up to `now` (the current second included)."""
        last = int(now)
        span = min(self.size, max(1, math.ceil(window)))
        for second in range(last - span + 1, last + 1):
            i = second % self.size
            if self.stamp[i] == second:
                yield i


_ZEROS = [0] * _B


class Observations:
    """What the gateway saw, for the request signals, and what the bus told, for restarts
    and evictions. Times are the caller's clock (the daemon's monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, horizon: int = HORIZON):
        self.clock = clock
        self._horizon = horizon
        self._rings: dict[str, _Ring] = {}
        self._restarts: dict[str, deque[float]] = {}
        self._evictions: deque[float] = deque()

    def request(self, model: str, code: int, ttfb_seconds: float | None, now: float) -> None:
        """One finished gateway request: its status and its time to first byte (queue
        excluded; None when no byte came from an engine)."""
        ring = self._rings.get(model)
        if ring is None:
            ring = self._rings[model] = _Ring(self._horizon)
        i = ring.slot(int(now))
        ring.total[i] += 1
        if code >= 500:
            ring.errors[i] += 1
        if ttfb_seconds is not None:
            ring.hist[ring.hslot(int(now)) * _B + bisect_left(TTFB_BOUNDS, ttfb_seconds)] += 1

    def first_byte(self, model: str, seconds: float, now: float) -> None:
        """A time to first byte alone, for a caller that learns it apart from the status
        (then `request(model, code, None, now)` counts the request)."""
        ring = self._rings.get(model)
        if ring is None:
            ring = self._rings[model] = _Ring(self._horizon)
        ring.hist[ring.hslot(int(now)) * _B + bisect_left(TTFB_BOUNDS, seconds)] += 1

    def listen(self, bus: EventBus) -> None:
        bus.on_event(self.on_event)

    def on_event(self, event: Event) -> None:
        """A synchronous bus listener: restarts (a STATE event with `restart_reason`, as
        metrics counts them) and evictions."""
        if event.kind is Kind.STATE and "restart_reason" in event.fields:
            times = self._restarts.setdefault(event.model or "", deque())
            self._append(times, self.clock())
        elif event.kind is Kind.EVICTED:
            self._append(self._evictions, self.clock())

    def _append(self, times: deque[float], now: float) -> None:
        times.append(now)
        while times and times[0] < now - self._horizon:
            times.popleft()

    # --- readers, at evaluation time ----------------------------------------------------------

    def counts(self, model: str, window: float, now: float) -> tuple[int, int]:
        """(requests, 5xx answers) of `model` over the last `window` seconds."""
        ring = self._rings.get(model)
        if ring is None:
            return 0, 0
        total = errors = 0
        for i in ring.seconds(now, window):
            total += ring.total[i]
            errors += ring.errors[i]
        return total, errors

    def ttfb_quantile(self, model: str, q: float, window: float, now: float) -> float | None:
        """The `q` quantile of the time to first byte over `window`; None without samples."""
        ring = self._rings.get(model)
        if ring is None:
            return None
        buckets = [0] * _B
        hist = ring.hist
        for i in ring.hslots(now, window):
            base = i * _B
            buckets = [a + b for a, b in zip(buckets, hist[base : base + _B], strict=True)]
        return quantile(buckets, q)

    def restarts(self, model: str, window: float, now: float) -> int:
        return sum(1 for t in self._restarts.get(model, ()) if t > now - window)

    def evictions_per_minute(self, window: float, now: float) -> float:
        count = sum(1 for t in self._evictions if t > now - window)
        return count / (window / 60.0) if window > 0 else 0.0


def quantile(buckets: Sequence[int], q: float) -> float | None:
    """The `q` quantile of counts per TTFB bucket, interpolated linearly inside the bucket
    (Prometheus's histogram_quantile; the overflow bucket answers its lower bound)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for b, count in enumerate(buckets):
        if count and seen + count >= rank:
            if b == len(TTFB_BOUNDS):
                return TTFB_BOUNDS[-1]
            lower = TTFB_BOUNDS[b - 1] if b else 0.0
            return lower + (TTFB_BOUNDS[b] - lower) * (rank - seen) / count
        seen += count
    return TTFB_BOUNDS[-1]


class Signals:
    """Every rule's signal values per label set, read when the rules are evaluated."""

    def __init__(
        self,
        observations: Observations,
        *,
        statuses: Callable[[], Iterable[ModelStatus]],
        accounts: Callable[[], Iterable[DeviceAccount]],
        devices: Callable[[], Mapping[str, DeviceSnapshot]],
        degraded: Callable[[], bool] | None = None,  # the state store's, once it exists
    ) -> None:
        self._obs = observations
        self._statuses = statuses
        self._accounts = accounts
        self._devices = devices
        self._degraded = degraded

    def read(self, rules: Sequence[AlertRule]) -> dict[str, dict[LabelSet, float]]:
        """Per rule name, its signal's value per label set."""
        now = self._obs.clock()
        sources = _Sources(self._statuses, self._accounts, self._devices)
        return {rule.name: self._signal(rule, now, sources) for rule in rules}

    def _signal(self, rule: AlertRule, now: float, sources: _Sources) -> dict[LabelSet, float]:
        signal, window = rule.signal, rule.window
        out: dict[LabelSet, float] = {}
        if signal.startswith("model_"):
            for st in sources.statuses:
                value = self._model_value(st, rule, now)
                if value is not None:
                    out[(("model", st.name),)] = value
        elif signal in ("device_memory_used_ratio", "device_memory_foreign_bytes"):
            for acc in sources.accounts:
                if signal == "device_memory_foreign_bytes":
                    out[(("device", acc.name),)] = float(acc.foreign)
                elif acc.used is not None and acc.total > 0:
                    out[(("device", acc.name),)] = acc.used / acc.total
        elif signal in ("device_utilization_ratio", "device_temperature_celsius"):
            for snap in sources.devices:
                reading = (
                    snap.utilization if signal == "device_utilization_ratio" else snap.temperature
                )
                if reading is not None:
                    out[(("device", snap.name),)] = float(reading)
        elif signal == "evictions_rate":
            out[()] = self._obs.evictions_per_minute(window, now)
        elif signal == "state_store_degraded" and self._degraded is not None:
            out[()] = 1.0 if self._degraded() else 0.0
        return out

    def _model_value(self, st: ModelStatus, rule: AlertRule, now: float) -> float | None:
        obs, signal, window = self._obs, rule.signal, rule.window
        if signal == "model_error_ratio":
            total, errors = obs.counts(st.name, window, now)
            if total == 0 or total < rule.min_requests:
                return None
            return errors / total
        if signal == "model_ttfb_p99_seconds":
            return obs.ttfb_quantile(st.name, 0.99, window, now)
        if signal == "model_queue_depth":
            return float(st.queue_depth)
        if signal == "model_restarts":
            return float(obs.restarts(st.name, window, now))
        if signal == "model_failed":
            return 1.0 if st.state is InstanceState.FAILED else 0.0
        if signal == "model_memory_over_reservation_bytes":
            # Only while an engine runs: a stopped model's last measurement is history.
            if st.state not in MEASURED or not st.measured_bytes:
                return None
            reserved = st.reserved_bytes or st.model.memory
            return float(over_reservation(st.measured_bytes, reserved))
        return None  # model_kv_cache_usage_ratio: not read from the engines yet


class _Sources:
    """The supervisor's views, each read at most once per evaluation and only if a rule
    needs it."""

    def __init__(
        self,
        statuses: Callable[[], Iterable[ModelStatus]],
        accounts: Callable[[], Iterable[DeviceAccount]],
        devices: Callable[[], Mapping[str, DeviceSnapshot]],
    ) -> None:
        self._read = (statuses, accounts, devices)

    @cached_property
    def statuses(self) -> list[ModelStatus]:
        return list(self._read[0]())

    @cached_property
    def accounts(self) -> list[DeviceAccount]:
        return list(self._read[1]())

    @cached_property
    def devices(self) -> list[DeviceSnapshot]:
        return list(self._read[2]().values())
