"""memory = "auto" at config load: sized from the model's files (config/sizing.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_pynvml import FakeGpu, FakeNvml
from tests.unit.config_files import problems, write
from vllmd.config import EngineConfig, check_config, load_config
from vllmd.config.diff import plan_reload
from vllmd.config.sizing import keep_sizing
from vllmd.engine.argv import EngineAddress, PlacedDevice, build_launch
from vllmd.sizing import Settings, estimate
from vllmd.sizing.shape import parse_shape
from vllmd.weights import CPU_ENGINE_FIXED_COST

MiB, GiB = 1024**2, 1024**3
QWEN_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}
WEIGHTS = 15_231_233_024  # Qwen2.5-7B-Instruct's safetensors (index.json's total_size)


def model_dir(root: Path, name: str, config: dict[str, Any], weights: int) -> Path:
    """A model directory as vLLM reads it: config.json and a (sparse) safetensors file."""
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    with (directory / "model.safetensors").open("wb") as f:
        f.truncate(weights)
    return directory


def test_memory_left_out_is_estimated_from_the_files(tmp_path: Path) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    text = '[models.qwen]\nmodel = "./qwen"\nmax_model_len = 8192\n'
    model = load_config(write(tmp_path, text)).models["qwen"]
    expected = estimate(parse_shape(QWEN_7B), WEIGHTS, Settings(max_model_len=8192, overhead=GiB))
    assert model.memory_auto and model.sizing is not None
    assert model.sizing.estimate == expected
    assert model.memory == expected.total
    # weights + one 8192-token sequence (28 layers x 4 KV heads x 128 x 2 x bf16) + the rest
    assert expected.kv == (8192 + 16) * 28 * 4 * 128 * 2 * 2  # and the null block
    assert 17 * GiB < model.memory < 19 * GiB


def test_memory_auto_is_the_same_as_left_out(tmp_path: Path) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    left_out = load_config(write(tmp_path, '[models.q]\nmodel = "./qwen"\n')).models["q"]
    auto = '[models.q]\nmodel = "./qwen"\nmemory = "auto"\n'
    assert load_config(write(tmp_path, auto)).models["q"].memory == left_out.memory


def test_an_explicit_memory_wins(tmp_path: Path) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    text = '[models.q]\nmodel = "./qwen"\nmemory = "30GiB"\n'
    model = load_config(write(tmp_path, text)).models["q"]
    assert (model.memory, model.memory_auto, model.sizing) == (30 * GiB, False, None)


def test_kv_sequences_sizes_the_kv_cache(tmp_path: Path) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    one = load_config(write(tmp_path, '[models.q]\nmodel = "./qwen"\n')).models["q"]
    text = '[models.q]\nmodel = "./qwen"\nkv_sequences = 3\n'
    three = load_config(write(tmp_path, text)).models["q"]
    assert one.sizing is not None and three.sizing is not None
    null = 16 * one.sizing.estimate.kv_per_token
    assert three.sizing.estimate.kv - null == 3 * (one.sizing.estimate.kv - null)
    assert problems(tmp_path, '[models.q]\nmodel = "./qwen"\nkv_sequences = 0\n') == [
        "models.q.kv_sequences: must be at least 1, got 0"
    ]


def test_a_cpu_model_adds_vllm_cpus_fixed_cost(tmp_path: Path) -> None:
    tiny = {**QWEN_7B, "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256}
    tiny |= {"vocab_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1}
    model_dir(tmp_path, "tiny", tiny, 4 * MiB)
    text = (
        '[devices.cpu0]\nkind = "cpu"\nmemory = "8GiB"\n'
        '[models.t]\nmodel = "./tiny"\ndevices = ["cpu0"]\nmax_model_len = 256\n'
    )
    model = load_config(write(tmp_path, text)).models["t"]
    assert model.sizing is not None
    assert model.sizing.estimate.overhead == CPU_ENGINE_FIXED_COST
    assert CPU_ENGINE_FIXED_COST < model.memory < CPU_ENGINE_FIXED_COST + 256 * MiB


def test_a_length_that_can_never_fit_names_max_model_len_and_the_largest_that_does(
    tmp_path: Path,
) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    text = (
        '[scheduler]\nheadroom = "1GiB"\n[devices.big]\nuuid = "GPU-1"\nmemory = "20GiB"\n'
        '[models.q]\nmodel = "./qwen"\ndevices = ["big"]\nkv_sequences = 8\n'
    )
    (found,) = problems(tmp_path, text)
    assert found.startswith(
        "models.q.max_model_len: at 32768 tokens x kv_sequences 8 the estimate "
    )
    assert 'can never fit device "big" (19.0GiB after the headroom)' in found
    longest = int(found.split("the largest that fits is ")[1].split(";")[0])
    fits = f"{text}max_model_len = {longest}\n"
    assert problems(tmp_path, fits) == []
    (over,) = problems(tmp_path, f"{text}max_model_len = {longest + 16}\n")
    assert over.startswith(f"models.q.max_model_len: at {longest + 16} tokens x kv_sequences 8")
    assert over.endswith(
        f"(19456MiB after the headroom); the largest that fits is {longest}; set "
        "max_model_len, or memory"
    )


def test_a_model_too_large_for_a_measured_gpu_names_max_model_len(tmp_path: Path) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    nvml = FakeNvml([FakeGpu("GPU-0", total=24 * GiB)])
    path = write(tmp_path, '[models.q]\nmodel = "./qwen"\nkv_sequences = 8\n')
    (found,) = check_config(path, nvml=nvml)
    assert found.startswith("models.q.max_model_len: at 32768 tokens x kv_sequences 8")
    assert found.endswith("(measured through NVML)")


def test_a_hub_id_not_downloaded_is_no_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    model = load_config(write(tmp_path, '[models.q]\nmodel = "Qwen/Qwen2.5-7B"\n')).models["q"]
    assert model.memory == 0 and model.sizing is None
    assert model.unsized == "Qwen/Qwen2.5-7B is not in the engine's HF cache yet"


def test_the_hf_cache_is_the_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.env and the model's env say where the engine looks; they win over the daemon's."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B" / "snapshots"
    snapshot.mkdir(parents=True)
    model_dir(snapshot, "abc", QWEN_7B, WEIGHTS)
    text = (
        f'[engine]\nenv = {{ HF_HUB_CACHE = "{tmp_path / "hub"}" }}\n'
        '[models.q]\nmodel = "Qwen/Qwen2.5-7B"\nmax_model_len = 8192\n'
    )
    model = load_config(write(tmp_path, text)).models["q"]
    assert model.sizing is not None and model.sizing.file_bytes == WEIGHTS


def test_an_architecture_it_cannot_size_names_memory(tmp_path: Path) -> None:
    model_dir(tmp_path, "mamba", {**QWEN_7B, "model_type": "mamba"}, GiB)
    (found,) = problems(tmp_path, '[models.m]\nmodel = "./mamba"\n')
    assert found.startswith("models.m.memory: cannot estimate ")
    assert found.endswith("per-sequence state this estimate does not model; set memory")


def test_a_changed_estimate_restarts_and_kv_sequences_is_an_engine_key(tmp_path: Path) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    old = load_config(write(tmp_path, '[models.q]\nmodel = "./qwen"\n'))
    new = load_config(write(tmp_path, '[models.q]\nmodel = "./qwen"\nkv_sequences = 2\n'))
    assert plan_reload(old, new).restart == ("q",)
    same = load_config(write(tmp_path, '[models.q]\nmodel = "./qwen"\n'))
    assert not plan_reload(old, same).changed


def test_a_local_directory_without_weights_is_not_sized_yet(tmp_path: Path) -> None:
    model_dir(tmp_path, "qwen", QWEN_7B, 0).joinpath("model.safetensors").unlink()
    model = load_config(write(tmp_path, '[models.q]\nmodel = "./qwen"\n')).models["q"]
    assert model.memory == 0 and model.sizing is None
    assert model.unsized.endswith("is not in the engine's directory yet")


def test_a_float32_checkpoint_on_cpu_is_sized_in_the_served_dtype(tmp_path: Path) -> None:
    """The cpu KV check of an explicit memory must not judge an estimate by the files."""
    fp32 = {**QWEN_7B, "torch_dtype": "float32", "num_hidden_layers": 2}
    model_dir(tmp_path, "m", fp32, 600 * MiB)
    text = (
        '[devices.cpu0]\nkind = "cpu"\nmemory = "8GiB"\n'
        '[models.m]\nmodel = "./m"\ndevices = ["cpu0"]\nmax_model_len = 256\n'
    )
    model = load_config(write(tmp_path, text)).models["m"]
    assert model.sizing is not None and model.sizing.estimate.weights == 300 * MiB


def test_the_engine_is_told_the_length_and_the_kv_cache_it_was_sized_for(tmp_path: Path) -> None:
    tiny = {**QWEN_7B, "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256}
    tiny |= {"vocab_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1}
    model_dir(tmp_path, "tiny", tiny, 4 * MiB)
    text = (
        '[devices.cpu0]\nkind = "cpu"\nmemory = "8GiB"\n'
        '[models.t]\nmodel = "./tiny"\ndevices = ["cpu0"]\n'
    )
    model = load_config(write(tmp_path, text)).models["t"]
    assert model.sizing is not None and model.max_model_len is None
    est = model.sizing.estimate
    placed = (PlacedDevice("cpu0", "cpu", 8 * GiB),)
    argv = build_launch(model, EngineConfig(), EngineAddress(uds=tmp_path / "s"), placed, {}).argv
    assert argv[argv.index("--max-model-len") + 1] == str(est.max_model_len) == "32768"
    kv = int(argv[argv.index("--kv-cache-memory-bytes") + 1])
    assert est.kv <= kv < est.kv + MiB  # the KV cache, not the workspace too (rounding: < 1 MiB)


def test_a_reload_while_the_files_are_away_keeps_the_sizing(tmp_path: Path) -> None:
    """A snapshot pruned or half downloaded at a reload: the model keeps what was sized for the
    same config, so a reload for another change does not stop it (to leave it unstartable)."""
    directory = model_dir(tmp_path, "qwen", QWEN_7B, WEIGHTS)
    text = '[models.q]\nmodel = "./qwen"\n'
    old = load_config(write(tmp_path, text))
    (directory / "model.safetensors").unlink()
    new = load_config(write(tmp_path, text))
    assert new.models["q"].memory == 0  # as the files are now
    kept = keep_sizing(old, new)
    assert kept.models["q"].memory == old.models["q"].memory and not kept.models["q"].unsized
    assert not plan_reload(old, kept).changed
    assert kept.model_for("q") is kept.models["q"]
    # Another change to the model's config: what was sized says nothing of it.
    other = load_config(write(tmp_path, text + "kv_sequences = 2\n"))
    assert keep_sizing(old, other).models["q"].memory == 0
    # Another engine overhead or a device it can no longer fit: not kept either.
    overhead = load_config(write(tmp_path, '[engine]\ngpu_overhead = "3GiB"\n' + text))
    assert keep_sizing(old, overhead).models["q"].memory == 0
    small = '[devices."0"]\nmemory = "10GiB"\n' + text
    assert keep_sizing(old, load_config(write(tmp_path, small))).models["q"].memory == 0


@pytest.mark.parametrize("name", ["model.gguf", "mistral"])
def test_a_local_checkpoint_without_config_json_names_memory(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".gguf"):
        path.write_bytes(b"GGUF")
    else:
        path.mkdir()
        (path / "params.json").write_text("{}")
    (found,) = problems(tmp_path, f'[models.m]\nmodel = "./{name}"\n')
    assert found.startswith("models.m.memory: cannot estimate ")
    assert found.endswith("no config.json (a GGUF file or a Mistral-format checkpoint); set memory")
