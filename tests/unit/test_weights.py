"""Weight sizes: the files vLLM would load, from a local directory or the HF cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllmd.weights import cpu_kv_cache_bytes, hf_hub_cache, hf_snapshot, weights_bytes

GiB = 2**30


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"w" * size)
    return path


class FakeHubCache:
    """A Hugging Face hub cache laid out like huggingface_hub's: snapshot files are relative
    symlinks into blobs/."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def repo(self, model_id: str) -> Path:
        return self.root / ("models--" + model_id.replace("/", "--"))

    def snapshot(
        self, model_id: str, revision: str, files: dict[str, int | str], *, main: bool = False
    ) -> Path:
        """Adds a snapshot; `files` maps a file name to its size, or to the name of a blob
        already written (to share one). `main`: refs/main names this revision."""
        repo = self.repo(model_id)
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for name, content in files.items():
            blob = (
                repo / "blobs" / content
                if isinstance(content, str)
                else write(repo / "blobs" / f"{revision}-{name}", content)
            )
            os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
        if main:
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text(revision)
        return snapshot


@pytest.fixture
def hub(tmp_path: Path) -> FakeHubCache:
    return FakeHubCache(tmp_path / "hub")


def env_for(hub: FakeHubCache) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(hub.root)}


def test_hub_id_is_sized_from_the_snapshot_refs_main_names(hub: FakeHubCache) -> None:
    """Regression: a hub id counted 0 bytes against the level-1 host-memory budget."""
    hub.snapshot("org/tiny", "aaa", {"model.safetensors": 5000, "config.json": 10}, main=True)
    newer = hub.snapshot("org/tiny", "bbb", {"model.safetensors": 7000})
    os.utime(newer, (2e9, 2e9))  # newer, but not the revision refs/main names

    assert weights_bytes("org/tiny", env_for(hub)) == 5000


def test_hub_id_without_refs_main_takes_the_newest_snapshot(hub: FakeHubCache) -> None:
    old = hub.snapshot("org/tiny", "aaa", {"model.safetensors": 5000})
    hub.snapshot("org/tiny", "bbb", {"model.safetensors": 7000})
    os.utime(old, (1e9, 1e9))

    assert weights_bytes("org/tiny", env_for(hub)) == 7000


def test_hub_snapshot_counts_each_blob_once_and_only_the_shards_its_index_names(
    hub: FakeHubCache,
) -> None:
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    snapshot = hub.snapshot(
        "org/sharded",
        "rev",
        {"model-1.safetensors": 3000, "model-2.safetensors": 4000, "stray.safetensors": 999},
        main=True,
    )
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    # A second name for the first shard's blob: the same bytes, counted once.
    index["weight_map"]["c"] = "alias.safetensors"
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    os.symlink(os.readlink(snapshot / "model-1.safetensors"), snapshot / "alias.safetensors")

    assert weights_bytes("org/sharded", env_for(hub)) == 7000


def test_hub_id_not_cached_is_none_not_zero(hub: FakeHubCache) -> None:
    hub.snapshot("org/configs-only", "rev", {"config.json": 10, "tokenizer.json": 20}, main=True)

    assert weights_bytes("org/missing", env_for(hub)) is None
    assert weights_bytes("org/configs-only", env_for(hub)) is None
    assert weights_bytes("not-a-hub-id", env_for(hub)) is None
    assert weights_bytes("org/../escape", env_for(hub)) is None


def test_hub_snapshot_linking_a_missing_blob_is_none(hub: FakeHubCache) -> None:
    snapshot = hub.snapshot("org/partial", "rev", {"model.safetensors": 5000}, main=True)
    (snapshot / "model.safetensors").resolve().unlink()

    assert weights_bytes("org/partial", env_for(hub)) is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/h", "HOME": "/u"}, "/c/hub"),
        ({"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HOME": "/h"}, "/legacy"),
        ({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x", "HOME": "/u"}, "/h/hub"),
        ({"HF_HOME": "~/hf", "HOME": "/u"}, "/u/hf/hub"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/u"}, "/x/huggingface/hub"),
        ({"HOME": "/u"}, "/u/.cache/huggingface/hub"),
        ({"HF_HUB_CACHE": "", "HOME": "/u"}, "/u/.cache/huggingface/hub"),
    ],
)
def test_hub_cache_location_follows_huggingface_hub(environ: dict[str, str], expected: str) -> None:
    assert hf_hub_cache(environ) == Path(expected)


def test_hub_cache_is_found_through_hf_home(tmp_path: Path) -> None:
    hub = FakeHubCache(tmp_path / "hf-home" / "hub")
    hub.snapshot("org/tiny", "rev", {"model.safetensors": 1234}, main=True)

    assert weights_bytes("org/tiny", {"HF_HOME": str(tmp_path / "hf-home")}) == 1234
    assert weights_bytes("org/tiny", {"HOME": str(tmp_path)}) is None
    assert hf_snapshot("org/tiny", {"HF_HOME": str(tmp_path / "hf-home")}) == (
        hub.repo("org/tiny") / "snapshots" / "rev"
    )


def test_local_dir_with_safetensors_and_bin_counts_the_safetensors_only(tmp_path: Path) -> None:
    """Regression: every .safetensors/.bin/.pt anywhere under the directory was summed, so a
    repo shipping both formats counted its weights twice."""
    write(tmp_path / "model.safetensors", 1000)
    write(tmp_path / "pytorch_model.bin", 1000)
    write(tmp_path / "original" / "model.safetensors", 5000)  # vLLM loads the top level only
    write(tmp_path / ".cache" / "huggingface" / "x.safetensors", 100)

    assert weights_bytes(str(tmp_path), {}) == 1000


def test_local_dir_of_bin_files_skips_training_leftovers(tmp_path: Path) -> None:
    write(tmp_path / "pytorch_model.bin", 1000)
    write(tmp_path / "training_args.bin", 10)
    write(tmp_path / "optimizer.pt", 10)

    assert weights_bytes(str(tmp_path), {}) == 1000


def test_local_dir_index_drops_the_consolidated_duplicate(tmp_path: Path) -> None:
    write(tmp_path / "model-00001-of-00002.safetensors", 3000)
    write(tmp_path / "model-00002-of-00002.safetensors", 4000)
    write(tmp_path / "extra.safetensors", 7000)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )

    assert weights_bytes(str(tmp_path), {}) == 7000


def test_local_dir_in_mistral_format_counts_the_consolidated_files(tmp_path: Path) -> None:
    write(tmp_path / "consolidated.safetensors", 6000)
    write(tmp_path / "model-00001-of-00001.safetensors", 6000)

    assert weights_bytes(str(tmp_path), {}) == 6000


def test_local_dir_whose_index_names_a_missing_shard_is_none(tmp_path: Path) -> None:
    write(tmp_path / "model-1.safetensors", 3000)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    )

    assert weights_bytes(str(tmp_path), {}) is None


def test_local_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    gguf = write(tmp_path / "tiny.Q4_K_M.gguf", 4321)
    write(tmp_path / "real" / "model.safetensors", 1000)
    os.symlink(tmp_path / "real", tmp_path / "linked")

    assert weights_bytes(str(tmp_path / "empty"), {}) == 0  # what is there: nothing
    assert weights_bytes(str(tmp_path / "nowhere"), {}) is None
    assert weights_bytes(str(gguf), {}) == 4321
    assert weights_bytes(str(tmp_path / "linked"), {}) == 1000


def test_cpu_kv_cache_is_what_the_fixed_cost_and_weights_leave() -> None:
    assert cpu_kv_cache_bytes(4 * GiB, GiB) == int(1.25 * GiB)  # the prior: 1.75 GiB
    assert cpu_kv_cache_bytes(int(2.5 * GiB), GiB) < 0
