"""What the benchmark suite runs things with: processes, configs, wrk and its parsed figures.

Everything listens on 127.0.0.1 ports picked free at start, in one temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FAST_ENGINE = BENCH / "fast_engine.py"
LITELLM_VENV = BENCH / ".litellm"
LITELLM = "litellm[proxy]==1.100.5"
COMPLETION = {"model": "m", "prompt": "hello", "max_tokens": 1}

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nJSON {"requests": %%d, "seconds": %%f, "p50": %%f, "p99": %%f, "max": %%f, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e6,
    latency:percentile(99) / 1e6, latency.max / 1e6,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Wrk:
    rps: float
    p50: float
    p99: float
    max: float
    errors: int  # connect/read/write errors, non-2xx answers and timeouts
    timeouts: int


def wrk(url: str, conns: int, seconds: float, tmp: Path, timeout: float = 2.0) -> Wrk:
    script = tmp / "wrk.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT % json.dumps(COMPLETION))
    threads = min(2, conns)
    args = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", f"--timeout={timeout:g}s"]
    out = subprocess.run(
        [*args, "-s", str(script), url], capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("JSON "))
    r = json.loads(line[5:])
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return Wrk(r["requests"] / r["seconds"], r["p50"], r["p99"], r["max"], errors, r["timeout"])


def wait_http(
    url: str, deadline: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> float:
    """Poll `url` (GET) until it answers; returns when, in time.time().

    One client without TLS set-up for every poll: `httpx.get` builds a client and its SSL
    context (the CA bundle parsed, ~50 ms of CPU here) each time, which made each poll a
    ~50 ms step that also took a core from what it waited for (a start-up time measured
    this way read ~25-50 ms late on this 2-core machine)."""
    end = time.monotonic() + deadline
    with httpx.Client(timeout=1.0, verify=False) as http:  # plain http:// only
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).status_code < 500:
                    return time.time()
            time.sleep(0.005)
    raise SystemExit(f"{url} did not answer within {deadline} s")


class Processes:
    """Child processes of one run, each in its own group, all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs[:]):
            self.stop(proc)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def vllmd_config(
    tmp: Path, port: int, models: dict[str, dict[str, Any]], name: str = "vllmd"
) -> Path:
    """A vllmd config serving `models` with the fast engine (their `env` set per model)."""
    lines = [
        "[daemon]",
        f'state_dir = "{tmp}/{name}-state"',
        f'control_socket = "{tmp}/{name}.sock"',
        "[gateway]",
        f'listen = "127.0.0.1:{port}"',
        "[engine]",
        f"command = [{json.dumps(sys.executable)}, {json.dumps(str(FAST_ENGINE))}]",
        'model_flag = "--model"',
        'health_interval = "1s"',
        "[devices.cpu0]",
        'kind = "cpu"',
        'memory = "100000GiB"',
    ]
    for model, extra in models.items():
        lines += [f"[models.{json.dumps(model)}]", f'model = "fast/{model}"']
        lines += ['devices = ["cpu0"]', 'memory = "3GiB"']
        if extra:
            env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in extra.items())
            lines.append(f"env = {{ {env} }}")
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def vllmd_argv(config: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "vllmd"), "serve", "--config", str(config)]


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  upstream engine {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def nginx(procs: Processes, tmp: Path, port: int, upstream: int) -> subprocess.Popen[bytes]:
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, upstream=upstream))
    # Debian puts it in /usr/sbin, which a user's PATH may not hold.
    exe = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin") or "nginx"
    return procs.start([exe, "-c", str(conf), "-p", str(tmp)], tmp / "nginx.log")


def litellm_bin() -> Path:
    """LiteLLM's proxy in its own venv under bench/, installed on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print(f"installing {LITELLM} into {LITELLM_VENV.relative_to(ROOT)} (first use)")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, LITELLM], check=True)
    return exe


def litellm(procs: Processes, tmp: Path, port: int, upstream: int) -> subprocess.Popen[bytes]:
    conf = tmp / "litellm.yaml"
    conf.write_text(
        "model_list:\n"
        "  - model_name: m\n"
        "    litellm_params:\n"
        "      model: openai/m\n"
        f"      api_base: http://127.0.0.1:{upstream}/v1\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {"LITELLM_LOG": "ERROR", "NO_DOCS": "True", "DISABLE_ADMIN_UI": "True"}
    argv = [str(litellm_bin()), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)]
    return procs.start(argv, tmp / "litellm.log", env)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.close()
