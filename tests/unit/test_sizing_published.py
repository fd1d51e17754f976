"""The estimator against published figures (tests/fixtures/sizing: each model's config.json and
checkpoint size as published, and what vLLM itself logged for it; sources in the README there).

Weights: the estimate (the checkpoint in the served dtype) within 3 % of vLLM's "Model loading
took X GiB" (or V0's "Loading model weights took X GB", which is GiB too). vLLM's figure is the
GPU memory the load took, so it sits a little above the files (buffers, rotary caches).
KV bytes per token: exactly what vLLM's logs imply (its KV memory over its token count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllmd.sizing import Settings, estimate
from vllmd.sizing.shape import parse_shape

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sizing"
GiB = 1024**3


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


# name -> vLLM's weights figure in GiB (the fixture's published.weights_gib, from its log line).
WEIGHTS = {
    "llama-3.1-8b": 14.9888,  # vllm#10517, V0, bf16
    "qwen2.5-7b": 14.2409,  # vLLM 0.5.1 tutorial log, bf16
    "gemma-2-9b": 17.3781,  # vllm#6478, vLLM 0.5.2, bf16
    "deepseek-v2-lite": 29.3010,  # vllm PR #4650, bf16
    "llama-3-8b-fp8": 8.4596,  # vLLM's fp8 docs: an FP8 checkpoint loads as stored
}
# name -> (KV memory, tokens) that vLLM logged together: bytes per token = memory / tokens.
KV_LOGS = {
    # "kv_cache_size=3.81GiB" with "# GPU blocks: 1952" of 16 tokens (vllm#10517)
    "llama-3.1-8b": (3.81 * GiB, 1952 * 16),
    # "0.95 GiB KV cache is needed" for "max seq len (32768)" (vllm#15871, MLA)
    "deepseek-v2-lite": (0.95 * GiB, 32768),
    # "Available KV cache memory: 8.0 GiB" / "GPU KV cache size: 149,712 tokens" (vLLM 0.26)
    "qwen2.5-7b-awq": (8.0 * GiB, 149_712),
}
# name -> KV bytes per token from the model card's shape where vLLM logged no pair: the
# formula's inputs, spelled out (layers x 2 x KV heads x head dim x 2 bytes of bf16).
KV_CARDS = {
    "qwen2.5-7b": 28 * 2 * 4 * 128 * 2,
    "mistral-7b": 32 * 2 * 8 * 128 * 2,
    "mixtral-8x7b": 32 * 2 * 8 * 128 * 2,
    "gemma-2-9b": 42 * 2 * 8 * 256 * 2,  # head_dim 256
}


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_weights_are_within_3_percent_of_vllms_own_figure(name: str) -> None:
    data = fixture(name)
    assert data["published"]["weights_gib"] == WEIGHTS[name]  # the table is the fixture's
    shape = parse_shape(data["config"])
    est = estimate(shape, data["weights_total_size"], Settings(max_model_len=4096))
    assert est.weights / GiB == pytest.approx(WEIGHTS[name], rel=0.03)


@pytest.mark.parametrize("name", sorted(KV_LOGS))
def test_kv_per_token_is_what_vllms_log_implies(name: str) -> None:
    memory, tokens = KV_LOGS[name]
    est = estimate(parse_shape(fixture(name)["config"]), 0, Settings(max_model_len=4096))
    # The logs round memory to 0.01 GiB: within that rounding, 0.5 %.
    assert est.kv_per_token == pytest.approx(memory / tokens, rel=0.005)


@pytest.mark.parametrize("name", sorted(KV_CARDS))
def test_kv_per_token_follows_the_model_card(name: str) -> None:
    est = estimate(parse_shape(fixture(name)["config"]), 0, Settings(max_model_len=4096))
    assert est.kv_per_token == KV_CARDS[name]


def test_mla_needs_what_vllm_said_for_one_full_sequence() -> None:
    """vllm#15871: "To serve at least one request with the models's max seq len (32768),
    (0.95 GiB KV cache is needed": the estimate's KV for one 32768-token sequence."""
    shape = parse_shape(fixture("deepseek-v2-lite")["config"])
    est = estimate(shape, 0, Settings(max_model_len=32768))
    assert round(est.kv / GiB, 2) == 0.95


def test_sliding_window_models_keep_less_than_full_length() -> None:
    """Mistral 7B v0.1 slides on every layer, Gemma 2 on every other one: at 32768 (Mistral)
    and 8192 (Gemma) tokens their KV is less than full attention's."""
    mistral = parse_shape(fixture("mistral-7b")["config"])
    est = estimate(mistral, 0, Settings(max_model_len=32768))
    blocks = -(-(4096 - 1 + 8192) // 16) + 1  # SlidingWindowSpec: one block more
    assert est.kv == 32 * (blocks + 1) * 16 * (2 * 8 * 128 * 2)  # and the null block
    gemma = parse_shape(fixture("gemma-2-9b")["config"])
    full = 8192 * 42 * 2 * 8 * 256 * 2
    extra = 21 * 16 * (2 * 8 * 256 * 2)  # window+batch > len: a block more per sliding layer
    null = 42 * 16 * (2 * 8 * 256 * 2)  # the block pool's null block
    assert estimate(gemma, 0, Settings(max_model_len=8192)).kv == full + extra + null
    assert estimate(gemma, 0, Settings(max_model_len=8192, max_num_batched_tokens=2048)).kv < full


def test_quantized_checkpoints_are_recognised() -> None:
    assert parse_shape(fixture("qwen2.5-7b-awq")["config"]).quantization == "awq"
    assert parse_shape(fixture("llama-3-8b-fp8")["config"]).quantization == "fp8"


def test_mixtral_passes_two_experts_per_token() -> None:
    shape = parse_shape(fixture("mixtral-8x7b")["config"])
    assert shape.ffn == 2 * 14336


def test_every_fixture_is_sized() -> None:
    """Each published model's own maximum length is read as vLLM derives it."""
    lengths = {
        p.stem: parse_shape(fixture(p.stem)["config"]).max_len for p in FIXTURES.glob("*.json")
    }
    assert lengths == {
        "llama-3.1-8b": 131072,
        "qwen2.5-7b": 32768,
        "qwen2.5-7b-awq": 32768,
        "mistral-7b": 32768,
        "mixtral-8x7b": 32768,
        "gemma-2-9b": 8192,
        "deepseek-v2-lite": 163840,
        "llama-3-8b-fp8": 8192,
    }
