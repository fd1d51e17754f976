"""`vllmd` as operators run it: a real process, real signals, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import FAKE_ENGINE
from vllmd.engine.process import group_alive

ROOT = Path(__file__).resolve().parents[2]
VLLMD = [sys.executable, "-m", "vllmd.cli.entry"]


def _write_config(tmp_path: Path, port: int, mode: str = "ok", stop_timeout: str = "3s") -> Path:
    path = tmp_path / "vllmd.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "state"
control_socket = "ctl.sock"
[gateway]
listen = "127.0.0.1:{port}"
[engine]
command = ["{sys.executable}", "{FAKE_ENGINE}"]
model_flag = "--model"
stop_timeout = "{stop_timeout}"
drain_timeout = "1s"
[devices.cpu0]
kind = "cpu"
memory = "16GiB"
[models.m]
model = "fake/m"
devices = ["cpu0"]
memory = "3GiB"
env = {{ FAKE_MODE = "{mode}" }}
"""
    )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(config: Path, port: int, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*VLLMD, "serve", "--config", str(config)], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            body = {"model": "m", "prompt": "x", "max_tokens": 1}
            if httpx.post(f"{url}/v1/completions", json=body, timeout=20).status_code == 200:
                models = httpx.get(f"{url}/v1/models").json()["data"]
                return proc, int(models[0]["vllmd"]["pid"])
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"daemon did not serve: {log.read_text()[-2000:]}")


def _gone(pgid: int) -> bool:
    return not group_alive(pgid)


def test_sigterm_stops_engines_and_exits_0(tmp_path: Path) -> None:
    port = _free_port()
    proc, engine = _start(_write_config(tmp_path, port), port, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert _gone(engine)


def test_second_signal_forces_exit_and_still_kills_engines(tmp_path: Path) -> None:
    """An engine that ignores SIGTERM with a long stop_timeout: the second Ctrl-C does not
    wait for it, and the engine is SIGKILLed on the way out."""
    port = _free_port()
    config = _write_config(tmp_path, port, mode="ignore_sigterm", stop_timeout="60s")
    proc, engine = _start(config, port, tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # draining, waiting for the stubborn engine
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 1
    assert time.monotonic() - started < 10
    assert _gone(engine)


def test_busy_port_is_one_line_naming_the_address_and_exit_1(tmp_path: Path) -> None:
    """Regression: anyio wrapped EADDRINUSE in an ExceptionGroup, so `except OSError` never
    matched and `vllmd serve` ended in a traceback. Nothing is left in RUNTIME_DIRECTORY."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        result = subprocess.run(
            [*VLLMD, "serve", "--config", str(_write_config(tmp_path, port))],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)},
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    naming = [line for line in output.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(naming) == 1, output
    assert "gateway.listen" in naming[0] and "in use" in naming[0]
    assert list(runtime.iterdir()) == []


def test_a_control_socket_another_daemon_answers_on_is_exit_1_naming_it(tmp_path: Path) -> None:
    """docs/design.md: a stale socket file is replaced, a live one (another daemon) is an error."""
    port = _free_port()
    first, _ = _start(_write_config(tmp_path, port), port, tmp_path)
    try:
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        config = _write_config(second_dir, _free_port())
        text = config.read_text().replace('"ctl.sock"', f'"{tmp_path / "ctl.sock"}"')
        config.write_text(text)
        result = subprocess.run(
            [*VLLMD, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert str(tmp_path / "ctl.sock") in output and "daemon.control_socket" in output


def test_config_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[models.m]\nmodel = "x"\nmemroy = "3GiB"\n')
    serve = subprocess.run([*VLLMD, "serve", "--config", str(path)], capture_output=True, text=True)
    check = subprocess.run([*VLLMD, "check-config", str(path)], capture_output=True, text=True)
    assert serve.returncode == 2 and check.returncode == 2
    assert "models.m.memroy" in check.stderr and 'did you mean "memory"' in check.stderr


def test_example_and_demo_configs_pass_check_config() -> None:
    for name in ("vllmd.toml", "demo.toml"):
        result = subprocess.run(
            [*VLLMD, "check-config", str(ROOT / "etc" / name)], capture_output=True
        )
        assert result.returncode == 0, result.stderr


def test_version() -> None:
    result = subprocess.run([*VLLMD, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("vllmd ")
