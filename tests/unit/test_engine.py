from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vllmd.config import Config, parse_config
from vllmd.engine.argv import (
    CPU_ENGINE_FIXED_COST,
    EngineAddress,
    PlacedDevice,
    build_launch,
    clean_environ,
    gpu_name,
    gpu_request,
)
from vllmd.engine.version import GpuNaming
from vllmd.errors import ConfigError
from vllmd.weights import weights_bytes

GiB = 2**30
MiB = 2**20


def _config(tmp_path: Path, model: dict[str, Any] | None = None, **engine: Any) -> Config:
    return parse_config(
        {
            "engine": engine,
            "devices": {"cpu0": {"kind": "cpu", "memory": "16GiB"}},
            "models": {
                "m": {"model": "org/m", "memory": "4GiB", "devices": ["0"], **(model or {})}
            },
        },
        tmp_path,
    )


GPU = (PlacedDevice("0", "gpu", 80 * GiB, "GPU-aaaa"),)
CPU = (PlacedDevice("cpu0", "cpu", 16 * GiB),)
UDS = EngineAddress(uds=Path("/run/x/engine.sock"))


def test_model_is_positional_by_default_and_after_model_flag_when_set(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    argv = build_launch(cfg.models["m"], cfg.engine, UDS, GPU, {}).argv
    assert argv[:3] == ("vllm", "serve", "org/m")
    cfg = _config(
        tmp_path,
        command=["python", "-m", "vllm.entrypoints.openai.api_server"],
        model_flag="--model",
    )
    argv = build_launch(cfg.models["m"], cfg.engine, UDS, GPU, {}).argv
    assert argv[3:5] == ("--model", "org/m")


def test_every_served_name_and_the_socket_are_passed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"aliases": ["org/alias", "two"]})
    argv = build_launch(cfg.models["m"], cfg.engine, UDS, GPU, {}).argv
    i = argv.index("--served-model-name")
    assert argv[i + 1 : i + 4] == ("m", "org/alias", "two")
    assert argv[argv.index("--uds") + 1] == "/run/x/engine.sock"
    assert "--port" not in argv and "--api-key" not in argv


def test_tcp_engines_get_a_random_api_key_and_no_sleep_mode(tmp_path: Path) -> None:
    cfg = _config(tmp_path, transport="tcp")
    a, b = EngineAddress.tcp("127.0.0.1", 18001), EngineAddress.tcp("127.0.0.1", 18002)
    assert a.api_key and b.api_key and a.api_key != b.api_key
    launch = build_launch(cfg.models["m"], cfg.engine, a, GPU, {"VLLM_SERVER_DEV_MODE": "1"})
    assert launch.argv[launch.argv.index("--api-key") + 1] == a.api_key
    assert "--enable-sleep-mode" not in launch.argv
    assert "VLLM_SERVER_DEV_MODE" not in launch.env


def test_gpu_reservation_becomes_a_rounded_down_utilization_fraction(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"memory": "20GiB"})
    argv = build_launch(
        cfg.models["m"], cfg.engine, UDS, (PlacedDevice("0", "gpu", 3 * 20 * GiB + 1),), {}
    ).argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.3333"


def test_the_fraction_leaves_the_engines_overhead_outside_it(tmp_path: Path) -> None:
    """vLLM creates its CUDA context before it takes F x CUDA's total: `memory` is the whole
    footprint, so F = (memory - overhead) / total (vllm/v1/worker/utils.py request_memory)."""
    cfg = _config(tmp_path, {"memory": "38GiB"})
    cuda_total = (81559 - 600) * MiB  # an H100 80GB: NVML v2 total less the driver's part
    placed = (PlacedDevice("0", "gpu", cuda_total, "GPU-a", overhead=GiB),)
    argv = build_launch(cfg.models["m"], cfg.engine, UDS, placed, {}).argv
    fraction = float(argv[argv.index("--gpu-memory-utilization") + 1])
    assert fraction == math.floor(37 * GiB / cuda_total * 10_000) / 10_000
    requested = gpu_request(cfg.models["m"], placed)
    assert requested == math.ceil(fraction * cuda_total)
    assert requested is not None and 37 * GiB - 10 * MiB < requested <= 37 * GiB
    assert gpu_request(cfg.models["m"], CPU) is None


def test_a_reservation_the_overhead_eats_whole_is_a_config_error(tmp_path: Path) -> None:
    """A learned overhead can outgrow a memory that passed the config's check."""
    cfg = _config(tmp_path, {"memory": "2GiB"})
    placed = (PlacedDevice("0", "gpu", 80 * GiB, "GPU-a", overhead=2 * GiB),)
    with pytest.raises(ConfigError, match=r"models\.m\.memory: .*overhead"):
        build_launch(cfg.models["m"], cfg.engine, UDS, placed, {})


def test_tensor_parallel_and_gpu_naming_on_two_gpus(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"devices": ["0", "1"]})
    two = (
        PlacedDevice("0", "gpu", 80 * GiB, "GPU-a", index=3),
        PlacedDevice("1", "gpu", 40 * GiB, "GPU-b", index=1),
    )
    launch = build_launch(cfg.models["m"], cfg.engine, UDS, two, {}, gpu_names="uuid")
    assert launch.argv[launch.argv.index("--tensor-parallel-size") + 1] == "2"
    # The smaller device bounds the fraction.
    assert launch.argv[launch.argv.index("--gpu-memory-utilization") + 1] == "0.1000"
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    by_index = build_launch(cfg.models["m"], cfg.engine, UDS, two, {}, gpu_names="index")
    assert by_index.env["CUDA_VISIBLE_DEVICES"] == "3,1"  # NVML's indices, in PCI bus order
    assert by_index.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


@pytest.mark.parametrize(
    ("uuid", "index", "naming", "name"),
    [
        ("GPU-a", 2, "uuid", "GPU-a"),
        ("GPU-a", 2, "index", "2"),
        (None, 2, "uuid", "2"),  # what is known of the other form
        ("GPU-a", None, "index", "GPU-a"),
        (None, None, "index", "0"),  # a declared GPU: its name
    ],
)
def test_a_gpu_is_named_in_the_form_asked_or_the_one_known(
    uuid: str | None, index: int | None, naming: GpuNaming, name: str
) -> None:
    assert gpu_name(PlacedDevice("0", "gpu", GiB, uuid, index=index), naming) == name


def test_sleep_mode_only_on_gpus_over_uds(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"devices": ["cpu0"]})
    gpu_launch = build_launch(_config(tmp_path).models["m"], cfg.engine, UDS, GPU, {})
    assert (
        "--enable-sleep-mode" in gpu_launch.argv and gpu_launch.env["VLLM_SERVER_DEV_MODE"] == "1"
    )
    cpu_launch = build_launch(cfg.models["m"], cfg.engine, UDS, CPU, {})
    assert "--enable-sleep-mode" not in cpu_launch.argv
    level0 = _config(tmp_path, {"sleep_level": 0})
    assert (
        "--enable-sleep-mode" not in build_launch(level0.models["m"], cfg.engine, UDS, GPU, {}).argv
    )


def test_cpu_reservation_becomes_kv_cache_bytes_after_fixed_cost_and_weights(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, {"devices": ["cpu0"]})
    argv = build_launch(cfg.models["m"], cfg.engine, UDS, CPU, {}, weights=100).argv
    kv = int(argv[argv.index("--kv-cache-memory-bytes") + 1])
    assert kv == 4 * GiB - CPU_ENGINE_FIXED_COST - 100


def test_cpu_reservation_too_small_for_any_kv_cache_is_a_config_error(tmp_path: Path) -> None:
    """The config check refuses this too; the launch stays defensive (weights known late)."""
    cfg = _config(tmp_path, {"devices": ["cpu0"], "memory": "2.5GiB"})
    with pytest.raises(ConfigError, match=r"models\.m\.memory"):
        build_launch(cfg.models["m"], cfg.engine, UDS, CPU, {}, weights=GiB)


def test_explicit_cpu_memory_keeps_the_prior_whatever_was_measured(tmp_path: Path) -> None:
    """A learned fixed cost (placed as the device's overhead) does not change an explicit
    memory's KV cache: check-config judged it against the prior, and a cost learned before
    the weights were downloaded holds them too."""
    cfg = _config(tmp_path, {"devices": ["cpu0"]})
    for overhead in (GiB + 7, 3 * GiB + 900 * 1024**2):
        measured = (replace(CPU[0], overhead=overhead),)
        argv = build_launch(cfg.models["m"], cfg.engine, UDS, measured, {}, weights=100).argv
        kv = int(argv[argv.index("--kv-cache-memory-bytes") + 1])
        assert kv == 4 * GiB - CPU_ENGINE_FIXED_COST - 100


def test_environment_precedence_and_cleaning(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        {"env": {"A": "model", "CUDA_VISIBLE_DEVICES": "9"}},
        env={"A": "engine", "B": "engine"},
    )
    base = {
        "A": "daemon",
        "C": "daemon",
        "NOTIFY_SOCKET": "/x",
        "WATCHDOG_USEC": "1",
        "LISTEN_FDS": "3",
    }
    env = build_launch(cfg.models["m"], cfg.engine, UDS, GPU, base).env
    assert env["A"] == "model" and env["B"] == "engine" and env["C"] == "daemon"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"  # vllmd's own setting wins
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"} & set(env)
    assert clean_environ({"WATCHDOG_PID": "1", "X": "y"}) == {"X": "y"}


def test_extra_args_come_last(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, {"args": ["--enable-prefix-caching"], "max_model_len": 4096, "dtype": "bfloat16"}
    )
    argv = build_launch(cfg.models["m"], cfg.engine, UDS, GPU, {}).argv
    assert argv[-1] == "--enable-prefix-caching"
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"


def test_weights_bytes_counts_weight_files_of_a_local_dir(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert weights_bytes(str(tmp_path), {}) == 1000
    assert weights_bytes("org/not-a-dir", {"HF_HUB_CACHE": str(tmp_path / "hub")}) is None


def test_weights_bytes_sizes_a_cached_hub_id(tmp_path: Path) -> None:
    """Regression: a hub id counted 0 bytes even when its snapshot was in the HF cache."""
    repo = tmp_path / "hub" / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"w" * 3000)
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc123")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}

    assert weights_bytes("org/m", env) == 3000
    assert weights_bytes("org/other", env) is None  # unknown: not cached


def test_cpu_placement_hides_the_hosts_gpus(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"devices": ["cpu0"]})
    env = build_launch(cfg.models["m"], cfg.engine, UDS, CPU, {"CUDA_VISIBLE_DEVICES": "0,1"}).env
    assert env["CUDA_VISIBLE_DEVICES"] == ""
