"""The daemon's RSS over rounds of mixed bursts, and what `malloc_trim` gives back after them.

vllmd runs under a wrapper (this file's `daemon` mode) that changes no product code: it sets
vllmd.gateway.proxy.MAX_BUFFERED (the bound on a plain answer read whole: the work tree's, or
none, as before the bound came), and on SIGUSR2 calls glibc's `malloc_trim(0)`, on SIGUSR1 a
full `gc.collect()` first; it writes the RSS before and after, the time taken, glibc's own
figures (`mallinfo2`) and the count of pymalloc blocks in use. The engines are the fast
engine (bench/fast_engine.py) with one addition (this file's `engine` mode): a plain
completion asking for `max_tokens` >= 4096 is answered with that many bytes.

Each round sends, all at once: wrk at 256 connections for 2 s (plain completions), 64
streams (64 chunks 5 ms apart), 32 clients that leave a stream after its first chunk, and 4
plain answers of 8 MB (`--parts` picks some). The daemon's RSS is read after each round and
after `--idle` seconds without traffic, then after `malloc_trim(0)`, then after
`gc.collect()` and `malloc_trim(0)`; the peak is the kernel's high-water mark (VmHWM). Three
runs, each on a fresh daemon: `bounded` (the work tree's MAX_BUFFERED), `unbounded` (every
plain answer read whole) and `bounded+each` (gc.collect() and malloc_trim(0) after every
round, as an idle timer would). At the end of the first two, one plain answer of `--big-mb`
MB alone: how far the daemon's peak rises over its RSS before it.

Run: python bench/rss_bursts.py [--rounds 9] [--idle 5] [--big-mb 200]   (~80 s; wrk needed)
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes  # the daemon imports it anyway: no RSS added to its own
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness import Processes

# The bench's own modules (harness brings httpx) are imported where used: the daemon and
# engine modes run this file too, and the daemon's RSS must be vllmd's own.
THIS = Path(__file__).resolve()
BIG = 4096  # max_tokens from which the engine answers that many bytes
# name: (MAX_BUFFERED as in the work tree, else none; gc.collect + malloc_trim each round)
RUNS = {"bounded": (True, False), "unbounded": (False, False), "bounded+each": (True, True)}
UNBOUNDED_LIMIT = 1 << 62
TRIM_FILE = "RSS_BURSTS_TRIM_FILE"
PARTS = {"plain": 256, "streams": 64, "leavers": 32, "large": 4}  # connections, per round
STREAM_ENV = {"FAST_CHUNKS": "64", "FAST_CHUNK_DELAY": "0.005"}


# --- daemon mode: vllmd with its buffering bound set and malloc_trim on SIGUSR2 -------------


def vm_kib(pid: int | str, key: str) -> int:
    """A `Vm*` line of /proc/PID/status, in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


MALLINFO2 = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class Mallinfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+), summed over all arenas."""

    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2.split(" ")]


def trim_handler(out: Path) -> Callable[[int, FrameType | None], None]:
    """The handler of SIGUSR2 (malloc_trim(0)) and SIGUSR1 (a full gc.collect() first), its
    figures written to `out` as JSON."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2

    def handler(signum: int, frame: FrameType | None) -> None:
        before = vm_kib("self", "VmRSS")
        began = time.perf_counter()
        collected = gc.collect() if signum == signal.SIGUSR1 else 0
        gc_took = time.perf_counter() - began
        info = libc.mallinfo2()
        libc.malloc_trim(0)
        took = time.perf_counter() - began
        figures = {
            "before_kib": before,
            "after_kib": vm_kib("self", "VmRSS"),
            "seconds": took,
            "gc_seconds": gc_took,
            "collected": collected,
            "malloc_in_use": info.uordblks + info.hblkhd,
            "python_blocks": sys.getallocatedblocks(),  # live objects' memory blocks, pymalloc's
            "malloc_free": info.fordblks,
            "heap": info.arena,
            "mmapped": info.hblkhd,
        }
        tmp = out.with_suffix(".tmp")  # renamed, so the bench never reads half of it
        tmp.write_text(json.dumps(figures))
        tmp.rename(out)

    return handler


def daemon(argv: list[str]) -> int:
    """`daemon LIMIT ARGS...`: vllmd's console script with MAX_BUFFERED = LIMIT."""
    from vllmd.cli import entry

    entry.prepare()  # as the console script: before the daemon's modules are imported
    from vllmd.cli.vllmd import main
    from vllmd.gateway import proxy

    proxy.MAX_BUFFERED = int(argv[0])
    handler = trim_handler(Path(os.environ[TRIM_FILE]))
    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGUSR2, handler)
    return main(argv[1:])


# --- engine mode: the fast engine, plus plain answers of any size -----------------------------


def engine() -> None:
    """The fast engine; a plain completion with max_tokens >= BIG gets that many bytes."""
    import fast_engine

    base = fast_engine.App

    class Sized(base):  # type: ignore[misc, valid-type]
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await super().__call__(scope, receive, send)
                return
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            size = int(json.loads(body).get("max_tokens", 1))
            if b'"stream": true' in body or size < BIG:

                async def replay() -> dict[str, Any]:
                    return {"type": "http.request", "body": body, "more_body": False}

                await super().__call__(scope, replay, send)
                return
            await sized_answer(send, size)

    fast_engine.App = Sized  # type: ignore[misc]  # main() builds fast_engine.App
    fast_engine.main()


async def sized_answer(send: Any, size: int) -> None:
    """A completion whose text makes the body `size` bytes, sent in 256 KiB pieces."""
    head = b'{"id":"cmpl-big","object":"text_completion","choices":[{"index":0,"text":"'
    tail = b'","finish_reason":"length"}]}'
    block = b"x" * (256 * 1024)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % size)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": head, "more_body": True})
    left = size - len(head) - len(tail)
    while left > 0:
        piece = block[: min(left, len(block))]
        left -= len(piece)
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": tail})


# --- the bench ----------------------------------------------------------------------------


def request(model: str, max_tokens: int, stream: bool) -> bytes:
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "stream": stream}
    data = json.dumps(body).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
    )


async def exchange(port: int, data: bytes, leave_after: int | None = None) -> tuple[bool, int]:
    """One request on its own connection: (status 200?, bytes read); `leave_after`: close
    once that many bytes came, mid-answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        first = await reader.read(65536)
        got = len(first)
        while leave_after is None or got < leave_after:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        return first.startswith(b"HTTP/1.1 200"), got
    finally:
        writer.close()


@dataclass
class Burst:
    plain: int = 0
    plain_errors: int = 0
    failed: int = 0  # streams and large answers not answered 200, or cut short
    large_bytes: int = 0
    wall: float = 0.0


async def burst(port: int, tmp: Path, large_mb: int, parts: set[str]) -> Burst:
    """One round of mixed traffic, all at once (the `parts` of it: PARTS)."""
    from harness import wrk

    url = f"http://127.0.0.1:{port}/v1/completions"
    began = time.monotonic()
    if "plain" in parts:
        plain = asyncio.create_task(asyncio.to_thread(wrk, url, 256, 2, tmp, 5.0))
    n = {part: 0 if part not in parts else count for part, count in PARTS.items()}
    streams = [exchange(port, request("s", 64, True)) for _ in range(n["streams"])]
    leave = [exchange(port, request("s", 64, True), 1) for _ in range(n["leavers"])]
    large = [exchange(port, request("m", large_mb << 20, False)) for _ in range(n["large"])]
    answers = await asyncio.gather(*streams, *leave, *large)
    out = Burst()
    if "plain" in parts:
        run = await plain
        out.plain, out.plain_errors = int(run.rps * 2), run.errors
    least = [64 * 50] * len(streams) + [0] * len(leave) + [large_mb << 20] * len(large)
    for (ok, got), want in zip(answers, least, strict=True):  # want: bytes it must have read
        out.failed += not ok or got < want
    out.large_bytes = sum(got for _, got in answers[len(answers) - len(large) :])
    out.wall = time.monotonic() - began
    return out


def trim(pid: int, out: Path, collect: bool = False) -> dict[str, float]:
    """Ask the daemon to malloc_trim(0), after a full gc.collect() if `collect`; its figures."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1 if collect else signal.SIGUSR2)
    end = time.monotonic() + 10
    while not out.exists():
        if time.monotonic() > end:
            raise SystemExit("the daemon did not answer SIGUSR2")
        time.sleep(0.01)
    figures: dict[str, float] = json.loads(out.read_text())
    return figures


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def mb(kib: float) -> str:
    return f"{kib / 1024:6.1f}"


@dataclass
class Run:
    """One daemon's figures, RSS in KiB."""

    name: str
    start: float = 0.0
    rounds: list[float] = field(default_factory=list)
    peak: float = 0.0
    idle: float = 0.0
    trimmed: float = 0.0  # after malloc_trim(0) alone
    trim_ms: float = 0.0
    collected: float = 0.0  # after gc.collect() and malloc_trim(0)
    collect_ms: float = 0.0
    big_rise: float | None = None  # the peak's rise during the one large answer


def held(figures: dict[str, float]) -> str:
    """What the daemon holds, from a trim's figures."""
    return (
        f"{mb(figures['after_kib']).strip()} MB (malloc in use "
        f"{mb(figures['malloc_in_use'] / 1024).strip()} MB, free "
        f"{mb(figures['malloc_free'] / 1024).strip()} MB before; "
        f"{figures['python_blocks'] / 1e3:.0f}k Python blocks)"
    )


def start_daemon(
    name: str, limit: int, tmp: Path, procs: Processes
) -> tuple[subprocess.Popen[bytes], int]:
    """vllmd through the wrapper, both engines started; the process and its port."""
    from harness import free_port, vllmd_argv, vllmd_config, wait_http

    port = free_port()
    config = vllmd_config(tmp, port, {"m": {}, "s": STREAM_ENV}, name=name)
    fast = json.dumps(str(THIS.parent / "fast_engine.py"))
    text = config.read_text()
    assert fast in text, "harness.vllmd_config no longer names the fast engine"
    config.write_text(text.replace(fast, f'{json.dumps(str(THIS))}, "engine"'))
    argv = [sys.executable, str(THIS), "daemon", str(limit), *vllmd_argv(config)[1:]]
    proc = procs.start(argv, tmp / f"{name}.log", {TRIM_FILE: str(tmp / f"{name}.trim")})
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    for model in ("m", "s"):  # starts both engines
        asyncio.run(exchange(port, request(model, 1, model == "s")))
    time.sleep(0.5)
    return proc, port


def one_run(name: str, limit: int, args: argparse.Namespace, tmp: Path, each: bool) -> Run:
    """Rounds of bursts on a fresh daemon; `each`: gc.collect() and malloc_trim after each."""
    from harness import processes

    out = tmp / f"{name}.trim"
    res = Run(name)
    with processes() as procs:
        proc, port = start_daemon(name, limit, tmp, procs)
        pid = proc.pid
        res.start = vm_kib(pid, "VmRSS")
        reset_peak(pid)
        print(f"\n{name}: start {mb(res.start)} MB", flush=True)
        for i in range(args.rounds):
            b = asyncio.run(burst(port, tmp, args.large_mb, args.parts))
            res.rounds.append(vm_kib(pid, "VmRSS"))
            line = (
                f"  round {i + 1}: {mb(res.rounds[-1])} MB  ({b.wall:.1f} s, {b.plain} plain, "
                f"{b.plain_errors} wrk errors, {b.failed} failed, {b.large_bytes >> 20} MB large)"
            )
            if each:
                line += f"; collected+trimmed: {held(trim(pid, out, collect=True))}"
            print(line, flush=True)
        res.peak = vm_kib(pid, "VmHWM")
        time.sleep(args.idle)
        res.idle = vm_kib(pid, "VmRSS")
        figures = trim(pid, out)
        res.trimmed, res.trim_ms = figures["after_kib"], figures["seconds"] * 1e3
        print(f"  peak {mb(res.peak)} MB, after {args.idle:g} s idle {mb(res.idle)} MB")
        print(f"  after malloc_trim(0): {held(figures)}, took {res.trim_ms:.1f} ms")
        figures = trim(pid, out, collect=True)
        res.collected, res.collect_ms = figures["after_kib"], figures["seconds"] * 1e3
        print(
            f"  then gc.collect() + malloc_trim(0): {held(figures)}, took {res.collect_ms:.1f} ms "
            f"({figures['collected']:.0f} objects collected, gc "
            f"{figures['gc_seconds'] * 1e3:.1f} ms)"
        )
        if args.big_mb and not each:
            time.sleep(0.2)
            before = vm_kib(pid, "VmRSS")
            reset_peak(pid)
            ok, got = asyncio.run(exchange(port, request("m", args.big_mb << 20, False)))
            res.big_rise = vm_kib(pid, "VmHWM") - before
            status = "" if ok and got > args.big_mb << 20 else " (NOT ANSWERED WHOLE)"
            print(
                f"  one {args.big_mb} MB plain answer: peak {mb(before + res.big_rise)} MB "
                f"(+{res.big_rise / 1024:.1f} MB){status}"
            )
        procs.stop(proc)
    return res


def summary(runs: list[Run], big_mb: int) -> None:
    print(
        "\nsummary, MB       start  last round  peak  idle  trim(0)  gc+trim  "
        f"gain  {big_mb} MB answer: peak rise"
    )
    for r in runs:
        gain = r.idle / r.collected if r.collected else 0.0
        big = "" if r.big_rise is None else f"+{r.big_rise / 1024:.1f}"
        print(
            f"  {r.name:14} {r.start / 1024:6.1f} {r.rounds[-1] / 1024:11.1f} "
            f"{r.peak / 1024:5.1f} {r.idle / 1024:5.1f} {r.trimmed / 1024:8.1f} "
            f"{r.collected / 1024:8.1f} {gain:4.2f}x  {big}"
        )
    print("  (gain: RSS after idle over RSS after gc.collect() and malloc_trim(0))")


def bench(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--idle", type=float, default=5.0, help="seconds without traffic at the end")
    p.add_argument("--large-mb", type=int, default=8, help="size of a round's large answers")
    p.add_argument("--big-mb", type=int, default=200, help="the single large answer; 0: none")
    p.add_argument("--parts", default=",".join(PARTS), help="of a round's traffic, these only")
    p.add_argument("--runs", default=",".join(RUNS), help="these runs only")
    args = p.parse_args(argv)
    args.parts = set(args.parts.split(","))
    from harness import COMPLETION

    assert COMPLETION["model"] == "m"  # wrk's requests go to the plain model
    from vllmd.gateway import proxy

    with tempfile.TemporaryDirectory(prefix="vllmd-rss-") as name:
        tmp = Path(name)
        runs = [
            one_run(name, proxy.MAX_BUFFERED if bounded else UNBOUNDED_LIMIT, args, tmp, each)
            for name, (bounded, each) in RUNS.items()
            if name in args.runs.split(",")
        ]
    summary(runs, args.big_mb)


def cli() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "daemon":
        sys.exit(daemon(sys.argv[2:]))
    if mode == "engine":
        sys.argv = [sys.argv[0], *sys.argv[2:]]  # the flags vllmd gives an engine
        engine()
        return
    bench(sys.argv[1:])


if __name__ == "__main__":
    cli()
