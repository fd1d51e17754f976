"""What vllmd's state is, read at scrape time: models, devices, event subscribers.

Nothing is copied in the background: every scrape asks the supervisor (and the event bus) for
their current views, so a series can never be stale or forgotten."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from vllmd.instance.states import MEASURED, InstanceState
from vllmd.metrics.hot import Family, Rows, TextCollector

if TYPE_CHECKING:
    from vllmd.devices import DeviceSnapshot
    from vllmd.instance.status import ModelStatus
    from vllmd.placement.ledger import DeviceAccount

S = InstanceState
STATES = tuple(InstanceState)
# The measured footprint is of the engine that runs now only in these states: before the
# first measurement of a start it is the previous engine's, and asleep it is not what the
# engine keeps. Elsewhere the series is absent, never a stale figure.


class Watched(Protocol):
    """What the collector reads of the supervisor."""

    def statuses(self) -> Iterable[ModelStatus]: ...
    def accounts(self) -> Sequence[DeviceAccount]: ...
    def devices(self) -> Mapping[str, DeviceSnapshot]: ...


class StateCollector(TextCollector):
    """Models and devices as the supervisor sees them now. `engine_version(model)` names the
    version of the model's engine ("" while unknown)."""

    def __init__(self, watched: Watched, engine_version: Callable[[str], str]) -> None:
        self._watched = watched
        self._engine_version = engine_version

    def families(self) -> Iterator[Family]:
        yield from self._models(self._watched.statuses())
        yield from self._devices(self._watched.accounts(), self._watched.devices())

    def _models(self, statuses: Iterable[ModelStatus]) -> Iterator[Family]:
        info = self.rows(
            "vllmd_model_info", "Configured models (always 1).", ["model", "engine_version"]
        )
        state = self.rows(
            "vllmd_model_state", "1 for the state the model is in.", ["model", "state"]
        )
        in_flight = self.rows("vllmd_model_in_flight_requests", "Requests being served.", ["model"])
        queue = self.rows("vllmd_model_queue_depth", "Requests waiting for the model.", ["model"])
        reserved = self.rows(
            "vllmd_model_reserved_bytes",
            "Memory the accounting holds for the model, per device.",
            ["model", "device"],
        )
        used = self.rows(
            "vllmd_model_memory_used_bytes",
            "Memory measured in use by the model's running engine, per device.",
            ["model", "device"],
        )
        last_used = self.rows(
            "vllmd_model_last_used_timestamp_seconds",
            "When a request last ended.",
            ["model"],
        )
        for st in statuses:
            name = st.name
            info.add([name, self._engine_version(name)], 1.0)
            for s in STATES:
                state.add([name, s.value], 1.0 if st.state is s else 0.0)
            in_flight.add([name], st.in_flight)
            queue.add([name], st.queue_depth)
            measured = st.measured_bytes if st.state in MEASURED and st.pid is not None else 0
            for device in st.model.devices:
                reserved.add([name, device], st.held_bytes)
                if measured:
                    used.add([name, device], measured)
            if st.last_used is not None:
                last_used.add([name], st.last_used)
        yield from (info, state, in_flight, queue, reserved, used, last_used)

    def _devices(
        self, accounts: Sequence[DeviceAccount], snapshots: Mapping[str, DeviceSnapshot]
    ) -> Iterator[Family]:
        def gauge(name: str, doc: str) -> Rows:
            return self.rows(f"vllmd_device_{name}", doc, ["device"])

        total = gauge("memory_total_bytes", "Memory vllmd may use on the device.")
        reserved = gauge("memory_reserved_bytes", "Memory held by vllmd's models.")
        used = gauge(
            "memory_used_bytes",
            "Memory measured in use (a cpu device: its engines' measured footprints).",
        )
        foreign = gauge("memory_foreign_bytes", "Memory used by processes vllmd does not own.")
        utilization = gauge("utilization_ratio", "Compute utilization, 0 to 1.")
        temperature = gauge("temperature_celsius", "Device temperature.")
        power = gauge("power_watts", "Power draw.")
        up = gauge("up", "1 when the device can be read and used.")
        for account in accounts:
            labels = [account.name]
            total.add(labels, account.total)
            reserved.add(labels, account.reserved)
            if account.used is not None:
                used.add(labels, account.used)
            foreign.add(labels, account.foreign)
            up.add(labels, 1.0 if account.up else 0.0)
            # Declared devices export what they know: the rest is absent, not 0.
            snap = snapshots.get(account.name)
            if snap is None:
                continue
            if snap.utilization is not None:
                utilization.add(labels, snap.utilization)
            if snap.temperature is not None:
                temperature.add(labels, snap.temperature)
            if snap.power is not None:
                power.add(labels, snap.power)
        yield from (total, reserved, used, foreign, utilization, temperature, power, up)


class DroppedCollector(TextCollector):
    """Events lost per queued subscriber of the event bus."""

    def __init__(self, dropped: Callable[[], Mapping[str, int]]) -> None:
        self._dropped = dropped

    def families(self) -> Iterator[Family]:
        family = self.rows(
            "vllmd_events_dropped",
            "Events a queued subscriber lost by falling behind its bound.",
            ["subscriber"],
            kind="counter",
        )
        for name, count in sorted(self._dropped().items()):
            family.add([name], count)
        yield family


class StoreCollector(TextCollector):
    """Whether the state store is degraded (locked, corrupt or full; events lost)."""

    def __init__(self, degraded: Callable[[], bool]) -> None:
        self._degraded = degraded

    def families(self) -> Iterator[Family]:
        family = self.rows(
            "vllmd_state_store_degraded",
            "1 while the state store cannot write (locked, corrupt or full) or lost events "
            "lately, else 0.",
            [],
        )
        family.add([], 1.0 if self._degraded() else 0.0)
        yield family
