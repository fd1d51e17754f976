"""Instructions per proxied request: vllmd vs the minimal proxy on vllmd's own server.

Each proxy runs under valgrind's callgrind (user-space instructions, counted, not timed), its
upstream the fast engine outside valgrind. After a warm-up, the counters are zeroed, wrk
sends requests at 32 connections for `--seconds`, and the counters are dumped: instructions
over requests answered. Unlike req/s or CPU time, the figure does not depend on how busy the
machine is or how the two cores are shared (repeat runs agree within ~1%), so it compares
one commit with another; it leaves out the kernel's share (socket calls, ~30% of the CPU).

Run: python bench/instructions.py [--seconds 15]   (valgrind from Debian; ~2 minutes)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import (
    BENCH,
    COMPLETION,
    FAST_ENGINE,
    Processes,
    free_port,
    processes,
    vllmd_argv,
    vllmd_config,
    wrk,
)

CALLGRIND = ["valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no"]


def _answered(url: str, deadline: float = 120.0) -> None:
    """Wait until a completion through `url` is answered (valgrind starts slowly)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if httpx.post(url, json=COMPLETION, timeout=30).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} never answered")


def count(argv: list[str], port: int, seconds: float, tmp: Path, procs: Processes) -> float:
    """Instructions per request of the proxy `argv` (listening on `port`) under callgrind."""
    out = tmp / f"callgrind.{port}"
    proc = procs.start([*CALLGRIND, f"--callgrind-out-file={out}", *argv], tmp / f"{port}.log")
    url = f"http://127.0.0.1:{port}/v1/completions"
    _answered(url)
    wrk(url, 32, 5, tmp)  # warm: connections, label sets, the upstream pool
    control = ["callgrind_control"]
    subprocess.run([*control, "-z", str(proc.pid)], check=True, capture_output=True)
    run = wrk(url, 32, seconds, tmp)
    subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
    dump = max(tmp.glob(f"callgrind.{port}.*"), key=lambda p: p.stat().st_mtime)
    total = next(
        int(line.split()[1])
        for line in dump.read_text().splitlines()
        if line.startswith(("summary:", "totals:"))
    )
    procs.stop(proc)
    return total / (run.rps * seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=15.0)
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (Debian package valgrind)")
    with tempfile.TemporaryDirectory(prefix="vllmd-instr-") as name, processes() as procs:
        tmp = Path(name)
        upstream = free_port()
        fast = procs.start([sys.executable, str(FAST_ENGINE), "--port", str(upstream)], tmp / "f")
        _answered(f"http://127.0.0.1:{upstream}/v1/completions")
        own = free_port()
        minimal = [sys.executable, str(BENCH / "minimal_proxy.py"), str(own), str(upstream)]
        bound = count([*minimal, "vllmd"], own, args.seconds, tmp, procs)
        port = free_port()
        daemon = vllmd_argv(vllmd_config(tmp, port, {"m": {}}))
        vllmd = count([sys.executable, *daemon], port, args.seconds, tmp, procs)
        procs.stop(fast)
    print(f"instructions per request at 32 connections (callgrind, {args.seconds:g} s of wrk):")
    print(f"  minimal proxy on vllmd's server {bound / 1e3:6.0f}k")
    print(f"  vllmd                           {vllmd / 1e3:6.0f}k ({vllmd / bound:.2f}x)")


if __name__ == "__main__":
    main()
