"""memory = "auto" on a GPU (the fake H100: 600 MiB reserved by the driver, 512 MiB of CUDA
context per engine outside its fraction): the fraction is the estimate's parts, the
reservation the parts and the overhead, which the first start measures: from then on the
model reserves what its engine takes, and no footprint is over its reservation."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import client, running
from tests.integration.test_gpu_memory import H100, _config, _events, _h100, _post_all
from tests.unit.test_config_auto_memory import QWEN_7B, WEIGHTS, model_dir
from vllmd.placement.reservation import sized_parts

pytestmark = pytest.mark.anyio
MiB, GiB = 1024**2, 1024**3


async def test_an_estimated_model_reserves_what_its_engine_was_measured_to_take(
    tmp_path: Path,
) -> None:
    gpu = _h100(tmp_path)
    directory = str(model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS))
    spec: dict[str, object] = {"model": directory, "memory": "auto", "max_model_len": 8192}
    config = _config(tmp_path, {"q": spec})
    model = config.models["q"]
    parts = sized_parts(model)
    assert model.memory == math.ceil((parts + GiB) / MiB) * MiB  # engine.gpu_overhead at first
    async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "q")
        first = run.supervisor.accounts()[0].models["q"]
        await run.supervisor.unload(run.supervisor.instances["q"])
        await _post_all(http, "q")
        second = run.supervisor.accounts()[0].models["q"]
        history = list(run.events.history)
        transport = httpx.AsyncHTTPTransport(uds=str(run.control_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as ctl:
            plan = (await ctl.get("/v1/plan")).json()
    one, two = (e.fields for e in _events(history, "measured", "q"))
    cuda_total = H100["total"] - H100["reserved"]
    fraction_bytes = math.ceil(math.floor(parts / cuda_total * 10_000) / 10_000 * cuda_total)
    # The fraction is the parts, whatever the overhead: the same at both starts.
    for measured in (one, two):
        assert measured["used_bytes"] == pytest.approx(
            fraction_bytes + H100["context"], abs=8 * MiB
        )
        assert measured["over_reservation_bytes"] == 0
    assert one["overhead_bytes"] == pytest.approx(H100["context"], abs=8 * MiB)
    # Reserved: the estimate with 1 GiB until the first start measured 512 MiB, then with that
    # from the moment it was measured.
    refined = math.ceil((parts + one["overhead_bytes"]) / MiB) * MiB
    assert first == second == refined < model.memory
    assert two["used_bytes"] <= refined + 64 * MiB
    (shown,) = plan["devices"][0]["models"]
    assert (shown["memory_bytes"], shown["reserved_bytes"]) == (model.memory, refined)
