"""A GPU model's `memory` must exceed the engine's GPU overhead of its first start
(engine.gpu_overhead, more across several GPUs): on a GPU, memory is the engine's whole
footprint per device, and vLLM's fraction is what the overhead leaves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.config_files import problems, write
from vllmd.config import EngineConfig, load_config
from vllmd.errors import ConfigError

ETC = Path(__file__).resolve().parents[2] / "etc"
GiB = 1024**3
MiB = 1024**2
WHY = (
    ": on a GPU, memory is the engine's whole footprint per device, CUDA context and NCCL "
    "buffers included, so vLLM would have no room for weights and KV cache; raise memory"
)


def model(name: str, memory: str, devices: str = '["0"]') -> str:
    return f'[models.{name}]\nmodel = "org/{name}"\nmemory = "{memory}"\ndevices = {devices}\n'


def test_first_overhead_is_gpu_overhead_plus_512_mib_across_several_gpus() -> None:
    engine = EngineConfig(gpu_overhead=2 * GiB)
    tp = 2 * GiB + 512 * MiB
    assert [engine.first_overhead(n) for n in (1, 2, 4)] == [2 * GiB, tp, tp]


def test_gpu_model_whose_memory_equals_the_overhead_is_refused_at_load(tmp_path: Path) -> None:
    """The daemon's load and reload (load_config) refuse it, naming the key and the figures."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, model("big", "1GiB")))
    assert caught.value.problems == [
        "models.big.memory: 1.0GiB is not more than the engine's GPU overhead of 1.0GiB "
        "(engine.gpu_overhead)" + WHY
    ]


def test_check_config_reports_it_too(tmp_path: Path) -> None:
    assert problems(tmp_path, model("big", "1GiB")) == [
        "models.big.memory: 1.0GiB is not more than the engine's GPU overhead of 1.0GiB "
        "(engine.gpu_overhead)" + WHY
    ]


def test_gpu_model_just_above_the_overhead_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, model("small", "1025MiB")))
    assert config.models["small"].memory == GiB + MiB


def test_tensor_parallel_model_below_its_overhead_is_refused(tmp_path: Path) -> None:
    """Above engine.gpu_overhead, below it + 512 MiB: refused across two GPUs."""
    text = model("tp", "1280MiB", '["0", "1"]')
    assert problems(tmp_path, text) == [
        "models.tp.memory: 1.2GiB is not more than the engine's GPU overhead of 1.5GiB "
        "(engine.gpu_overhead 1.0GiB + 512.0MiB for tensor parallel across 2 GPUs)" + WHY
    ]


def test_tensor_parallel_model_above_its_overhead_is_accepted(tmp_path: Path) -> None:
    assert problems(tmp_path, model("tp", "1537MiB", '["0", "1"]')) == []


def test_the_overhead_is_the_configured_one(tmp_path: Path) -> None:
    text = '[engine]\ngpu_overhead = "4GiB"\n' + model("a", "4GiB") + model("b", "5GiB")
    assert problems(tmp_path, text) == [
        "models.a.memory: 4.0GiB is not more than the engine's GPU overhead of 4.0GiB "
        "(engine.gpu_overhead)" + WHY
    ]


def test_a_declared_gpu_counts_as_a_gpu(tmp_path: Path) -> None:
    text = '[devices.big]\nuuid = "GPU-8f3c"\n' + model("m", "512MiB", '["big"]')
    assert problems(tmp_path, text) == [
        "models.m.memory: 512.0MiB is not more than the engine's GPU overhead of 1.0GiB "
        "(engine.gpu_overhead)" + WHY
    ]


def test_cpu_model_with_small_memory_is_accepted(tmp_path: Path) -> None:
    """cpu engines have no GPU overhead (their own check is the KV cache's)."""
    text = (
        '[engine]\ngpu_overhead = "8GiB"\n[devices.cpu0]\nkind = "cpu"\nmemory = "16GiB"\n'
        + model("small", "3GiB", '["cpu0"]')
    )
    assert load_config(write(tmp_path, text)).models["small"].memory == 3 * GiB


def test_a_model_mixing_cpu_and_gpu_gets_the_mix_problem_only(tmp_path: Path) -> None:
    text = '[devices.c]\nkind = "cpu"\nmemory = "64GiB"\n' + model("m", "1GiB", '["c", "0"]')
    assert problems(tmp_path, text) == ["models.m.devices: mixes cpu and gpu devices"]


def test_a_bad_memory_is_reported_once(tmp_path: Path) -> None:
    assert problems(tmp_path, model("m", "0")) == [
        'models.m.memory: must be more than 0 (or "auto")'
    ]


@pytest.mark.parametrize("path", sorted(ETC.glob("*.toml")), ids=lambda p: p.name)
def test_the_example_configs_still_load(path: Path) -> None:
    assert load_config(path).models
