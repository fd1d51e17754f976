"""Time scheduler decisions on a large host: 1,000 configured models over 8 devices.

Run: python bench/bench_scheduler.py   (prints median and p99 per decision, in microseconds)
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from vllmd.instance.states import InstanceState
from vllmd.placement.scheduler import DeviceView, ModelView, Snapshot, plan_idle, plan_load

S = InstanceState
GB = 1 << 30
NOW = 100_000.0
N_MODELS, N_DEVICES, N_READY, N_SLEEPING = 1_000, 8, 30, 80
ITERATIONS = 2_000


def build(rng: random.Random) -> Snapshot:
    devices = {str(i): DeviceView(str(i), 80 * GB, headroom=GB) for i in range(N_DEVICES)}
    models: dict[str, ModelView] = {}
    for i in range(N_MODELS):
        first = rng.randrange(N_DEVICES)
        tp = 2 if i % 10 == 0 and first < N_DEVICES - 1 else 1  # some tensor-parallel pairs
        devs = tuple(str(first + k) for k in range(tp))
        state = S.READY if i < N_READY else S.SLEEPING if i < N_READY + N_SLEEPING else S.STOPPED
        # Ready models sit on device i % 7, leaving device 7 with room for small starts.
        if state is S.READY:
            devs = (str(i % (N_DEVICES - 1)),)
        models[f"m{i}"] = ModelView(
            name=f"m{i}",
            devices=devs,
            memory=rng.choice((4, 8, 16, 20)) * GB,
            state=state,
            residue=GB // 2 if state is S.SLEEPING else 0,
            last_used=NOW - rng.uniform(60, 7200),
            active_since=NOW - 7200,
            state_since=NOW - rng.uniform(60, 7200),
            priority=rng.choice((0, 0, 0, 1, 2)),
            sleep_level=rng.choice((0, 1, 2)),
            host_bytes=8 * GB,
            pinned=i % 97 == 0,
        )
    return Snapshot(NOW, devices, models, min_residency=60.0, host_memory_free=64 * GB)


def pick(snap: Snapshot, want_evictions: bool) -> str:
    """A stopped model whose load starts without (or only after) evictions."""
    for name, m in snap.models.items():
        if m.state is not S.STOPPED:
            continue
        plan = plan_load(snap, name)
        if plan.kind == "start" and bool(plan.evictions) == want_evictions:
            return name
    raise SystemExit(f"no model found (want_evictions={want_evictions})")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    samples = []
    for _ in range(ITERATIONS):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return statistics.median(samples) / 1e3, samples[int(len(samples) * 0.99)] / 1e3


def main() -> None:
    snap = build(random.Random(42))
    fits, evicts = pick(snap, want_evictions=False), pick(snap, want_evictions=True)
    ttl = {name: 1800.0 for name in snap.models}
    n_evictions = len(plan_load(snap, evicts).evictions)
    cases: list[tuple[str, Callable[[], object]]] = [
        # A fresh snapshot each time, as the placer takes one per pass (its sums are cached).
        (f"plan_load fits ({fits})", lambda: plan_load(replace(snap), fits)),
        (f"plan_load evicts {n_evictions} ({evicts})", lambda: plan_load(replace(snap), evicts)),
        ("plan_idle", lambda: plan_idle(replace(snap), ttl, 3600.0)),
    ]
    print(f"{N_MODELS} models, {N_DEVICES} devices, {ITERATIONS} iterations per case")
    for label, fn in cases:
        median, p99 = timed(fn)
        print(f"{label:<36} median {median:9.1f} us   p99 {p99:9.1f} us")


if __name__ == "__main__":
    main()
