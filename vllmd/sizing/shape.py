"""A model's shape, read from its config.json: the figures that size its weights, KV cache and
workspace. The keys and their fallbacks follow what vLLM reads (vllm/config/model.py
`get_num_kv_heads`, `get_head_size`, `_get_and_verify_max_len`; vllm/v1/kv_cache_interface.py
for which layers keep what).

Reading is blocking file-system work (a stat or two and one small JSON file): the daemon runs
it in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllmd.weights import hf_snapshot

# Encoder-only architectures vLLM serves as pooling models: their attention keeps no KV cache
# (vllm/attention/layers/encoder_only_attention.py: `get_kv_cache_spec` returns None).
ENCODER_ONLY = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "electra",
        "mpnet",
        "nomic_bert",
        "modernbert",
        "deberta",
        "deberta-v2",
        "new",
        "gte",
    }
)
# Hybrid and state-space models: their Mamba / linear-attention layers keep a fixed state per
# sequence, sized by kernels this estimator does not model.
HYBRID = frozenset(
    {
        "mamba",
        "mamba2",
        "falcon_mamba",
        "jamba",
        "zamba2",
        "bamba",
        "falcon_h1",
        "nemotron_h",
        "granitemoehybrid",
        "qwen3_next",
        "plamo2",
        "lfm2",
        "minimax_text_01",
        "minimax_m1",
        "rwkv",
        "recurrent_gemma",
    }
)
ATTENTION_LAYERS = {"full_attention": False, "attention": False, "sliding_attention": True}
# vLLM's _get_and_verify_max_len: the smallest of these that the config has.
MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


class Unsized(ValueError):
    """The model's files say what it is, and it is nothing this estimator can size."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    architecture: str
    model_type: str
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    ffn: int  # the widest MLP activation a token passes (dense, or its routed experts' sum)
    vocab: int
    max_len: int | None  # the model's own limit, rope scaling included
    checkpoint_dtype: str
    quantization: str | None  # quantization_config's quant_method
    kv_latent: int | None = None  # MLA: kv_lora_rank + qk_rope_head_dim, per token and layer
    windows: tuple[int | None, ...] = ()  # per layer: its sliding window, None for full
    encoder_only: bool = False


def read_shape(model: str, environ: Mapping[str, str]) -> ModelShape | None:
    """The shape of `model` (a local directory, or a hub id in the HF cache that `environ`
    points to); None when its config.json is not there (a hub id not downloaded yet). Raises
    Unsized for a config.json that cannot be sized."""
    path = Path(model)
    directory = path if path.is_dir() else hf_snapshot(model, environ)
    if directory is None:
        return None
    try:
        text = (directory / "config.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unsized(f"cannot read {directory / 'config.json'}: {exc.strerror}") from exc
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise Unsized(f"{directory / 'config.json'} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise Unsized(f"{directory / 'config.json'} is not a JSON object")
    return parse_shape(config)


def parse_shape(config: Mapping[str, Any]) -> ModelShape:
    """The shape a config.json describes (raises Unsized with the reason)."""
    text = config.get("text_config")
    merged: dict[str, Any] = {**config, **text} if isinstance(text, dict) else dict(config)
    architectures = merged.get("architectures") or ["unknown"]
    architecture = str(architectures[0])
    model_type = str(merged.get("model_type", ""))
    if model_type in HYBRID:
        raise Unsized(
            f"{architecture} ({model_type}) has state-space or linear-attention layers, whose "
            "per-sequence state this estimate does not model"
        )
    layers = _first_int(merged, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first_int(merged, "hidden_size", "n_embd", "d_model")
    heads = _first_int(merged, "num_attention_heads", "n_head", "num_heads")
    missing = [
        key
        for key, value in (
            ("num_hidden_layers", layers),
            ("hidden_size", hidden),
            ("num_attention_heads", heads),
        )
        if value is None
    ]
    if layers is None or hidden is None or heads is None:
        raise Unsized(f"{architecture}: config.json has no {', '.join(missing)}")
    kv_heads = _first_int(merged, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None:
        kv_heads = 1 if merged.get("multi_query") else heads
    head_dim = _first_int(merged, "head_dim") or hidden // heads
    return ModelShape(
        architecture=architecture,
        model_type=model_type,
        layers=layers,
        hidden=hidden,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=_ffn(merged, hidden),
        vocab=_first_int(merged, "vocab_size", "padded_vocab_size") or 0,
        max_len=_max_len(merged),
        checkpoint_dtype=str(merged.get("torch_dtype") or merged.get("dtype") or "float32"),
        quantization=_quantization(config),
        kv_latent=_kv_latent(merged),
        windows=_windows(merged, layers, architecture),
        encoder_only=model_type in ENCODER_ONLY,
    )


def _first_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _ffn(config: Mapping[str, Any], hidden: int) -> int:
    """A token's widest MLP activation: the dense intermediate size, or for a mixture of
    experts the routed (and shared) experts' intermediates it passes."""
    dense = _first_int(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    top_k = _first_int(config, "num_experts_per_tok", "moe_topk", "top_k")
    if top_k is None:
        return dense
    expert = _first_int(config, "moe_intermediate_size", "expert_intermediate_size") or dense
    shared = _first_int(config, "n_shared_experts") or 0
    return max(dense, expert * (top_k + shared))


def _max_len(config: Mapping[str, Any]) -> int | None:
    """The model's own length as vLLM derives it (vllm/config/model.py
    `_get_and_verify_max_len`): the smallest of the keys, rope scaling applied (not for Gemma
    3, whose max_position_embeddings is scaled already), then `model_max_length` (Command-R,
    Cohere 2) as an override."""
    keys = [key for key in MAX_LEN_KEYS if key != "model_max_length"]
    lengths = [v for v in (_first_int(config, key) for key in keys) if v is not None]
    override = _first_int(config, "model_max_length")
    if not lengths:
        return override
    length = min(lengths)
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(scaling, dict) and "gemma3" not in str(config.get("model_type", "")):
        rope_type = scaling.get("rope_type") or scaling.get("type")
        factor = scaling.get("factor")
        # vLLM leaves these alone: their max_position_embeddings is the scaled length already.
        if rope_type not in ("su", "longrope", "llama3", "mrope", "default", None) and (
            isinstance(factor, int | float) and factor > 0
        ):
            if rope_type == "yarn":
                length = _first_int(scaling, "original_max_position_embeddings") or length
            length = int(length * factor)
    return override or length


def _quantization(config: Mapping[str, Any]) -> str | None:
    for key in ("quantization_config", "compression_config"):
        section = config.get(key)
        if isinstance(section, dict):
            return str(section.get("quant_method") or section.get("format") or key)
    return None


def _kv_latent(config: Mapping[str, Any]) -> int | None:
    """Multi-head latent attention (DeepSeek V2/V3) keeps one compressed latent and its rope
    part per token and layer, not K and V per head (vllm/v1/kv_cache_interface.py
    `MLAAttentionSpec`)."""
    rank = _first_int(config, "kv_lora_rank")
    if rank is None:
        return None
    return rank + (_first_int(config, "qk_rope_head_dim") or 0)


def _windows(config: Mapping[str, Any], layers: int, architecture: str) -> tuple[int | None, ...]:
    window = _first_int(config, "sliding_window")
    kinds = config.get("layer_types")
    if isinstance(kinds, list) and kinds:
        unknown = sorted({str(k) for k in kinds} - set(ATTENTION_LAYERS))
        if unknown:
            raise Unsized(
                f"{architecture} has {', '.join(unknown)} layers, whose per-sequence state "
                "this estimate does not model"
            )
        listed = [window if ATTENTION_LAYERS[str(k)] else None for k in kinds[:layers]]
        return (*listed, *[None] * (layers - len(listed)))  # unlisted layers: full (safe)
    if window is None or config.get("use_sliding_window") is False:
        return (None,) * layers
    model_type = config.get("model_type")
    if model_type == "gemma2":  # every other layer, from the first (transformers' Gemma2Config)
        return tuple(window if i % 2 == 0 else None for i in range(layers))
    pattern = _first_int(config, "sliding_window_pattern")
    if model_type in ("gemma3", "gemma3_text") or pattern:  # every pattern-th layer is full
        pattern = pattern or 6
        return tuple(window if (i + 1) % pattern else None for i in range(layers))
    return (window,) * layers  # Mistral's configs: every layer slides
