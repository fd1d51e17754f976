"""A running daemon's real /metrics: promtool finds nothing to complain about, and a chat
request moves the per-model request series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import chat, client, fake_config, running
from vllmd.metrics import Metrics

pytestmark = pytest.mark.anyio


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool missing: apt-get install prometheus"
    return subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_pass_promtool_and_move_with_a_chat_request(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"m": {}})
    async with running(config) as run, client(run) as http:
        answer = await http.post("/v1/chat/completions", json=chat("m"))
        assert answer.status_code == 200
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    done = promtool_check(text)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert "_created" not in text
    got = samples(text)
    chat_route = (("code", "200"), ("endpoint", "/v1/chat/completions"), ("model", "m"))
    assert got[("vllmd_requests_total", chat_route)] == 1
    route = (("endpoint", "/v1/chat/completions"), ("model", "m"))
    assert got[("vllmd_request_duration_seconds_count", route)] == 1
    assert got[("vllmd_time_to_first_byte_seconds_count", (("model", "m"),))] == 1
    assert got[("vllmd_model_state", (("model", "m"), ("state", "ready")))] == 1
    assert got[("vllmd_model_loads_total", (("model", "m"), ("result", "ok")))] == 1
    # The engine's version, from its GET /version once it is ready.
    assert got[("vllmd_model_info", (("engine_version", "0.32.0+fake"), ("model", "m")))] == 1


async def test_supervisor_watched_whole_gives_device_series_promtool_accepts(
    tmp_path: Path,
) -> None:
    """`Metrics.watch(supervisor)` (the wiring to come): models and devices, promtool-clean."""
    config = fake_config(tmp_path, {"m": {}})
    async with running(config) as run:
        metrics = Metrics(CollectorRegistry())
        metrics.count_events(run.events)
        metrics.watch(run.supervisor)
        text = metrics.exposition()[0].decode()
    done = promtool_check(text)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    got = samples(text)
    assert got[("vllmd_device_up", (("device", "cpu0"),))] == 1
    assert got[("vllmd_device_memory_total_bytes", (("device", "cpu0"),))] == 64 * 2**30
    assert got[("vllmd_model_state", (("model", "m"), ("state", "stopped")))] == 1
