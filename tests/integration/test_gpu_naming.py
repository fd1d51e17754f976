"""How GPUs are named to vLLM: by UUID for a vLLM that reads them (>= 0.24), by NVML index
(with CUDA_DEVICE_ORDER=PCI_BUS_ID) otherwise. The fake engine dies on a UUID below 0.24 as
vLLM does (`int()` of each CUDA_VISIBLE_DEVICES entry, vllm#41848)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.fakes.fake_gpu import FakeGpu
from tests.integration.harness import client, fake_config, running
from vllmd.config import Config
from vllmd.events import Kind

pytestmark = pytest.mark.anyio


def _config(tmp_path: Path) -> Config:
    return fake_config(tmp_path, {"a": {"devices": ["0"], "memory": "8GiB"}}, devices={})


@pytest.mark.parametrize(
    ("installed", "version", "forms"),
    [
        ("vllm 0.20.1", "0.20.1", ["index", "index"]),
        (None, "0.24.0", ["index", "uuid"]),  # unknown: indices, until GET /version says
        ("vllm 0.32.0", "0.32.0", ["uuid", "uuid"]),
    ],
)
async def test_gpus_are_named_as_the_installed_vllm_reads_them(
    tmp_path: Path, installed: str | None, version: str, forms: list[str]
) -> None:
    """The installed version is read once, before the first spawn on a GPU; an engine of that
    version starts at the first try (a UUID would kill the 0.20.1 one)."""
    gpu = FakeGpu(tmp_path / "gpu")
    asked: list[tuple[str, ...]] = []

    def probe(command: tuple[str, ...], env: Mapping[str, str]) -> str | None:
        asked.append(command)
        return installed

    env = {**gpu.env(), "FAKE_VLLM_VERSION": version}
    with capture_logs() as logs:
        async with running(_config(tmp_path), env, probe=gpu, engine_version=probe) as run:
            async with client(run) as http:
                for _ in range(2):
                    r = await http.post("/v1/completions", json={"model": "a", "prompt": "x"})
                    assert r.status_code == 200, r.text
                await run.supervisor.unload(run.supervisor.get("a"))
                r = await http.post("/v1/completions", json={"model": "a", "prompt": "x"})
                assert r.status_code == 200, r.text
            history = list(run.events.history)
    assert len(asked) == 1  # once per engine command, not per start
    assert [e.kind for e in history].count(Kind.START_FAILED) == 0
    named = [e for e in logs if e["event"] == "gpus_named"]
    assert [e["form"] for e in named] == forms
    assert version in named[-1]["why"]  # the second start goes by the engine's own GET /version


async def test_an_engine_that_dies_on_a_uuid_is_given_indices_from_then_on(
    tmp_path: Path,
) -> None:
    """The installed version says 0.32 but the engine is a 0.20.1 (another environment on the
    PATH, say): the first start dies with vLLM's ValueError; its restart names indices and
    starts."""
    gpu = FakeGpu(tmp_path / "gpu")

    def probe(command: tuple[str, ...], env: Mapping[str, str]) -> str | None:
        return "vllm 0.32.0"

    env = {**gpu.env(), "FAKE_VLLM_VERSION": "0.20.1"}
    with capture_logs() as logs:
        async with running(_config(tmp_path), env, probe=gpu, engine_version=probe) as run:
            async with client(run) as http:
                first = await http.post("/v1/completions", json={"model": "a", "prompt": "x"})
                second = await http.post("/v1/completions", json={"model": "a", "prompt": "x"})
            history = list(run.events.history)
    failed = [e for e in history if e.kind == "start_failed"]
    assert len(failed) == 1
    assert first.status_code == 502
    assert second.status_code == 200, second.text
    named = [e for e in logs if e["event"] == "gpus_named"]
    assert [e["form"] for e in named] == ["uuid", "index"]
    assert "refused a UUID" in named[-1]["why"]
