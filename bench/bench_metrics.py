"""The cost of vllmd's metrics: recording one gateway request on the hot path, and rendering
`/metrics` for a daemon of N models (a real Supervisor, wired as the daemon wires it, every
model with traffic on two routes, so every histogram has its series).

Run: python bench/bench_metrics.py [--models N] [--requests R] [--renders K]
Prints a table of figures (medians where repeated); asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from vllmd.config import parse_config
from vllmd.devices import DeclaredProbe
from vllmd.metrics import Metrics
from vllmd.wiring import Parts, Seams, build

ROUTES = ("/v1/chat/completions", "/v1/completions")


def daemon(n: int, tmp: Path) -> Parts:
    data = {
        "daemon": {"state_dir": str(tmp / "state"), "control_socket": str(tmp / "ctl.sock")},
        "gateway": {"listen": "127.0.0.1:0"},
        "engine": {"command": [sys.executable, "-c", "pass"]},
        "devices": {
            "cpu0": {"kind": "cpu", "memory": "1024GiB"},
            "cpu1": {"kind": "cpu", "memory": "1024GiB"},
        },
        "models": {
            f"model-{i:03d}": {"model": f"fake/m{i}", "devices": [f"cpu{i % 2}"], "memory": "3GiB"}
            for i in range(n)
        },
    }
    config = parse_config(data, tmp)
    return build(config, Seams(probe=DeclaredProbe(config.devices)), tmp)


def per_call(fn: Callable[[int], None], count: int) -> float:
    """Seconds per call of `fn(i)`, the median of 5 rounds of `count` calls."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        rounds.append((time.perf_counter() - start) / count)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--renders", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        parts = daemon(args.models, Path(tmp))
        # Wired as wiring.py will wire it: the supervisor itself (devices included).
        metrics = Metrics(CollectorRegistry())
        metrics.count_events(parts.events)
        metrics.watch(parts.supervisor)
        models = sorted(parts.supervisor.instances)
        # Traffic on every model and route: every series a busy daemon has exists.
        for model in models:
            for route in ROUTES:
                metrics.request(model, route, 200, 0.2)
            metrics.queued(model, 0.01)
            metrics.first_byte(model, 0.05)
            metrics.rejected(model, "queue_full")

        m = len(models)

        def full_request(i: int) -> None:
            model = models[i % m]
            metrics.queued(model, 0.003)
            metrics.first_byte(model, 0.042)
            metrics.request(model, ROUTES[i & 1], 200, 0.3)

        calls: list[tuple[str, Callable[[int], None]]] = [
            ("request()", lambda i: metrics.request(models[i % m], ROUTES[0], 200, 0.3)),
            ("queued()", lambda i: metrics.queued(models[i % m], 0.003)),
            ("first_byte()", lambda i: metrics.first_byte(models[i % m], 0.04)),
            ("rejected()", lambda i: metrics.rejected(models[i % m], "queue_full")),
            ("one proxied request (queued+first_byte+request)", full_request),
        ]
        rows = [(name, f"{per_call(fn, args.requests) * 1e6:.2f} us") for name, fn in calls]

        renders = []
        body = b""
        for _ in range(args.renders):
            start = time.perf_counter()
            body, _ = metrics.exposition()
            renders.append(time.perf_counter() - start)
        statuses = [
            per_call(lambda i: list(parts.supervisor.statuses()), 20),
            per_call(lambda i: parts.supervisor.accounts(), 20),
        ]
        text = body.decode()
        samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        families = text.count("# TYPE ")
        rows += [
            (f"/metrics render, {m} models (median)", f"{statistics.median(renders) * 1e3:.2f} ms"),
            (f"/metrics render, {m} models (min)", f"{min(renders) * 1e3:.2f} ms"),
            (f"/metrics render, {m} models (max)", f"{max(renders) * 1e3:.2f} ms"),
            ("  of which supervisor.statuses()", f"{statuses[0] * 1e3:.2f} ms"),
            ("  of which supervisor.accounts()", f"{statuses[1] * 1e3:.2f} ms"),
            ("/metrics size", f"{len(body) / 1024:.1f} KiB"),
            ("/metrics samples / families", f"{samples} / {families}"),
            ("_created series", str(text.count("_created"))),
        ]
    load = f"{os.getloadavg()[0]:.2f} / {os.cpu_count()}"
    rows.append(("host load average (1 min) / cpus", load))
    width = max(len(name) for name, _ in rows)
    print(f"{'figure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
