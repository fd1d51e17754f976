"""The plan: `vllmctl plan` against a running daemon, `vllmd check-config --plan` with it down,
and the pure `build_plan` they share (placement/plan.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.integration.harness import FAKE_ENGINE, client, fake_config, running
from tests.integration.test_vllmctl import vllmctl
from vllmd.cli.render import plan_text
from vllmd.config import load_config
from vllmd.placement.plan import build_plan

pytestmark = pytest.mark.anyio
GiB, MiB = 1024**3, 1024**2
VLLMD = [sys.executable, "-m", "vllmd.cli.entry"]
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "intermediate_size": 256,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}


def tiny_dir(root: Path, name: str) -> str:
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY))
    with (directory / "model.safetensors").open("wb") as f:
        f.truncate(2 * MiB)
    return str(directory)


def three_models(tmp_path: Path) -> dict[str, Any]:
    """Two tiny models sized from their files, one explicit, on a 7 GiB cpu device."""
    return {
        "a": {"model": tiny_dir(tmp_path, "a"), "memory": "auto", "max_model_len": 256},
        "b": {"model": tiny_dir(tmp_path, "b"), "memory": "auto", "max_model_len": 256},
        "big": {"memory": "5GiB"},
    }


def test_the_plan_shows_parts_pairs_and_what_never_fits(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        three_models(tmp_path),
        devices={"cpu0": {"kind": "cpu", "memory": "7GiB"}},
        scheduler={"headroom": "512MiB"},
    )
    plan = build_plan(config, {}, {"big": 5 * GiB + 100 * MiB})
    (device,) = plan["devices"]
    assert (device["total_bytes"], device["usable_bytes"]) == (7 * GiB, 7 * GiB - 512 * MiB)
    models = {m["name"]: m for m in device["models"]}
    a = models["a"]
    assert a["source"] == "estimate" and a["memory_bytes"] == config.models["a"].memory
    est = a["estimate"]
    assert est["max_model_len"] == 256 and est["kv_sequences"] == 1
    assert est["weights_bytes"] == 2 * MiB and est["kv_bytes"] == (256 + 128) * 2 * 64 * 2 * 2
    parts = sum(est[k] for k in ("weights_bytes", "kv_bytes", "workspace_bytes", "overhead_bytes"))
    assert a["memory_bytes"] - MiB < parts <= a["memory_bytes"]
    assert models["big"]["source"] == "explicit" and models["big"]["estimate"] is None
    assert models["big"]["measured_bytes"] == 5 * GiB + 100 * MiB
    # a + b fit (about 5 GiB); big (held at its measured 5.1 GiB) fits with neither.
    assert device["together"] == [["a", "b"]]
    assert not device["all_fit"]
    assert plan["warnings"] == ['big cannot be resident with any other model on "cpu0"']
    text = plan_text(plan)
    assert text.splitlines()[0] == "cpu0 (cpu): 7.0GiB, 6.5GiB after the headroom"
    assert "together: a+b; all at once: no" in text
    assert 'warning: big cannot be resident with any other model on "cpu0"' in text


def test_a_gpu_of_unknown_size_judges_nothing(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"g": {"devices": ["0"], "memory": "20GiB"}}, devices={})
    (device,) = build_plan(config, {}, {})["devices"]
    assert device["usable_bytes"] is None and device["together"] == []
    assert "all at once: unknown" in plan_text(build_plan(config, {}, {}))
    (known,) = build_plan(config, {"0": 80 * GiB}, {})["devices"]
    assert known["kind"] == "gpu" and known["all_fit"]
    small = build_plan(config, {"0": 16 * GiB}, {})  # a GPU smaller than the config thought
    assert small["warnings"] == ['g can never fit device "0": 20.0GiB > 15.0GiB after the headroom']


def test_an_unsized_model_is_shown_with_its_reason(tmp_path: Path) -> None:
    cache = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    config = fake_config(tmp_path, {"later": {"memory": "auto", "env": cache}})
    plan = build_plan(config, {}, {})
    (model,) = plan["devices"][0]["models"]
    assert model["source"] == "unsized" and model["memory_bytes"] is None
    with_one = fake_config(
        tmp_path, {"later": {"memory": "auto", "env": cache}, "now": {"memory": "3GiB"}}
    )
    (device,) = build_plan(with_one, {}, {})["devices"]
    assert device["together"] == [] and not device["all_fit"]  # unsized: fits nothing yet
    assert "later: not sized yet: fake/later is not in the engine's HF cache yet" in plan_text(plan)


async def test_vllmctl_plan_asks_the_daemon(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path, three_models(tmp_path), devices={"cpu0": {"kind": "cpu", "memory": "12GiB"}}
    )
    async with running(config, {}) as run:
        async with client(run) as http:
            r = await http.post("/v1/completions", json={"model": "big", "prompt": "x"})
            assert r.status_code == 200, r.text
        shown = await vllmctl(config.daemon.control_socket, "--json", "plan")
        text = await vllmctl(config.daemon.control_socket, "plan")
    assert shown.rc == 0, shown.err
    plan = json.loads(shown.out)
    (device,) = plan["devices"]
    models = {m["name"]: m for m in device["models"]}
    assert models["big"]["measured_bytes"] is not None  # measured after its start
    assert models["a"]["measured_bytes"] is None and models["a"]["source"] == "estimate"
    assert device["total_bytes"] == 12 * GiB
    assert text.rc == 0 and text.lines[0].startswith("cpu0 (cpu): 12.0GiB")


async def test_check_config_plan_works_with_the_daemon_down(tmp_path: Path) -> None:
    """With the daemon down, the plan has the estimates, and the footprints the state store
    recorded while it ran."""
    lines = [
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'control_socket = "{tmp_path / "ctl.sock"}"\n',
        f"[engine]\ncommand = {json.dumps([sys.executable, str(FAKE_ENGINE)])}\n"
        'model_flag = "--model"\n',
        '[gateway]\nlisten = "127.0.0.1:0"\n',
        '[devices.cpu0]\nkind = "cpu"\nmemory = "7GiB"\n',
    ]
    for name, spec in three_models(tmp_path).items():
        lines.append(f'[models.{name}]\nmodel = "{spec.get("model", "org/" + name)}"\n')
        lines += [f"{k} = {json.dumps(v)}\n" for k, v in spec.items() if k != "model"]
        lines.append('devices = ["cpu0"]\n')
    path = tmp_path / "vllmd.toml"
    path.write_text("".join(lines))
    async with running(load_config(path), {}) as run, client(run) as http:
        r = await http.post("/v1/completions", json={"model": "big", "prompt": "x"})
        assert r.status_code == 200, r.text
    done = await anyio.run_process([*VLLMD, "check-config", "--plan", "--json", str(path)])
    plan = json.loads(done.stdout)
    models = {m["name"]: m for m in plan["devices"][0]["models"]}
    assert list(models) == ["a", "b", "big"]
    assert models["big"]["measured_bytes"] > 0  # from the store
    assert models["a"]["measured_bytes"] is None and models["a"]["estimate"] is not None
    assert plan["devices"][0]["together"] == [["a", "b"]]
    text = await anyio.run_process([*VLLMD, "check-config", "--plan", str(path)])
    assert b"together: a+b; all at once: no" in text.stdout
    plain = await anyio.run_process([*VLLMD, "check-config", str(path)])
    assert plain.stdout.decode().strip() == f"{path}: ok"
