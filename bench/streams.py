"""The suite's timing figures: streaming pass-through, lazy start and crash reaction."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
from harness import FAST_ENGINE, Processes, free_port, vllmd_argv, vllmd_config, wait_http

STAMP = re.compile(rb'"t": ([0-9.]+)\}')
STREAM_BODY = {"model": "", "prompt": "hello", "max_tokens": 64, "stream": True}


class Sink(Protocol):
    def add(self, name: str, value: float, unit: str, reference: str) -> None: ...


def _request(model: str, body: dict[str, Any]) -> bytes:
    data = json.dumps({**body, "model": model}).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )


def delays(port: int, model: str) -> tuple[list[float], float]:
    """One stream: each stamped chunk's delay from the engine's send to its arrival here,
    and the time from the request to the last byte."""
    out: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        began = time.time()
        sock.sendall(_request(model, STREAM_BODY))
        tail = b""
        done = False
        while not done:
            data = sock.recv(65536)
            now = time.time()
            if not data:
                break
            tail += data
            *whole, tail = tail.split(b"\n\n")
            done = any(b"[DONE]" in part for part in whole)
            out += [now - float(m) for part in whole for m in STAMP.findall(part + b"}")]
        return out, time.time() - began


def body_of(port: int, model: str) -> bytes:
    body = {**STREAM_BODY, "model": model}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
        return b"".join(r.iter_raw())


def streaming(tmp: Path, procs: Processes, res: Sink) -> None:
    print("\n2. Streaming pass-through (fast upstream, 64 chunks per stream)")
    stamped = {"FAST_STAMP": "1", "FAST_CHUNKS": "64", "FAST_CHUNK_DELAY": "0.002"}
    burst = {"FAST_CHUNKS": "512"}
    port_s, port_f, port_v = free_port(), free_port(), free_port()
    for port, env in ((port_s, stamped), (port_f, burst)):
        procs.start(
            [sys.executable, str(FAST_ENGINE), "--port", str(port)], tmp / "stream.log", env
        )
    daemon = procs.start(
        vllmd_argv(vllmd_config(tmp, port_v, {"s": stamped, "f": burst}, name="stream")),
        tmp / "stream-vllmd.log",
    )
    for port in (port_s, port_f):
        wait_http(f"http://127.0.0.1:{port}/health")
    wait_http(f"http://127.0.0.1:{port_v}/health", proc=daemon)
    for model in ("s", "f"):  # starts both engines
        body_of(port_v, model)
    direct: list[float] = []
    proxied: list[float] = []
    chunks_direct: list[float] = []
    chunks_proxied: list[float] = []
    for _ in range(20):  # interleaved
        direct += delays(port_s, "s")[0]
        proxied += delays(port_v, "s")[0]
        chunks_direct.append(512 / delays(port_f, "f")[1])
        chunks_proxied.append(512 / delays(port_v, "f")[1])
    d50, p50 = statistics.median(direct), statistics.median(proxied)
    added = (p50 - d50) * 1e3
    same = body_of(port_f, "f") == body_of(port_v, "f") and len(body_of(port_v, "f")) > 0
    cd, cp = statistics.median(chunks_direct), statistics.median(chunks_proxied)
    print(
        f"chunk delay p50: direct {d50 * 1e3:.3f} ms, vllmd {p50 * 1e3:.3f} ms, added "
        f"{added:+.3f} ms; chunks/s direct {cd:.0f}, vllmd {cp:.0f} ({cp / cd:.2f}x); "
        f"bytes identical: {same}"
    )
    res.add("stream.direct.chunk_delay_p50", d50 * 1e3, "ms", "-")
    res.add("stream.vllmd.chunk_delay_p50", p50 * 1e3, "ms", "stream.direct.chunk_delay_p50")
    res.add("stream.vllmd.added_chunk_delay_p50", added, "ms", "target <= 0.2")
    res.add("stream.direct.chunks_per_s", cd, "chunks/s", "-")
    res.add("stream.vllmd.chunks_per_s", cp, "chunks/s", "stream.direct.chunks_per_s")
    res.add("stream.bytes_identical", float(same), "bool", "target 1")


def _control(tmp: Path, name: str) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(tmp / f"{name}.sock"))
    return httpx.Client(transport=transport, base_url="http://vllmd", timeout=60)


def _first_byte(port: int, model: str) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_request(model, {"prompt": "hi", "max_tokens": 1}))
        sock.recv(1)
        return time.time()


def lazy_start(tmp: Path, procs: Processes, res: Sink) -> None:
    print("\n3. Lazy start (fake engine listening 0.5 s after its start)")
    ready = tmp / "lazy-ready"
    env = {"FAST_STARTUP_DELAY": "0.5", "FAST_READY_FILE": str(ready)}
    port = free_port()
    daemon = procs.start(
        vllmd_argv(vllmd_config(tmp, port, {"lazy": env}, name="lazy")), tmp / "lazy.log"
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc=daemon)
    after: list[float] = []
    with _control(tmp, "lazy") as ctl:
        for _ in range(5):
            ready.unlink(missing_ok=True)
            first = _first_byte(port, "lazy")
            after.append(first - float(ready.read_text()))
            ctl.post("/v1/models/lazy/unload").raise_for_status()
    median = statistics.median(after) * 1e3
    print(
        f"first byte after the engine's /health turned 200: median {median:.1f} ms "
        f"(runs: {', '.join(f'{a * 1e3:.1f}' for a in after)} ms)"
    )
    res.add("lazy.first_byte_after_health", median, "ms", "target <= 25")


def _state_left_ready(log: Path, model: str, since: float) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if (event.get("event"), event.get("model"), event.get("old")) == ("state", model, "ready"):
            stamp = time.mktime(time.strptime(event["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
            t = stamp - time.timezone + float("0." + event["timestamp"][20:-1])
            if t >= since:
                return t
    return None


def crash_reaction(tmp: Path, procs: Processes, res: Sink) -> None:
    print("\n4. Crash reaction (the engine's process group SIGKILLed)")
    port = free_port()
    log = tmp / "crash.log"
    daemon = procs.start(vllmd_argv(vllmd_config(tmp, port, {"c": {}}, name="crash")), log)
    wait_http(f"http://127.0.0.1:{port}/health", proc=daemon)
    noticed: list[float] = []
    with _control(tmp, "crash") as ctl:
        for _ in range(3):
            ctl.post("/v1/models/c/load").raise_for_status()
            pid = ctl.get("/v1/models/c").json()["pid"]
            time.sleep(0.3)
            killed = time.time()
            os.killpg(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while (t := _state_left_ready(log, "c", killed)) is None and time.monotonic() < end:
                time.sleep(0.05)
            if t is not None:
                noticed.append(t - killed)
            time.sleep(0.2)
    median = statistics.median(noticed) * 1e3 if noticed else float("nan")
    print(
        f"state left ready after the kill: median {median:.1f} ms "
        f"(runs: {', '.join(f'{a * 1e3:.1f}' for a in noticed)} ms)"
    )
    res.add("crash.noticed", median, "ms", "target <= 5")
