"""Checks of a config against the host's GPUs as NVML reads them (through a fake pynvml)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from tests.fakes.fake_pynvml import FakeGpu, FakeNvml
from vllmd.config import (
    Config,
    check_config,
    check_devices,
    device_problems,
    parse_config,
    read_devices,
)

GiB = 2**30
UUID0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
UUID1 = "GPU-11111111-aaaa-bbbb-cccc-111111111111"


def config(tmp_path: Path, models: dict[str, dict[str, Any]], **tables: dict[str, Any]) -> Config:
    specs = {name: {"model": "org/m", **spec} for name, spec in models.items()}
    return parse_config({"models": specs, **tables}, tmp_path)


def test_model_larger_than_an_nvml_gpu_is_a_problem_naming_the_figures(tmp_path: Path) -> None:
    """Regression: check-config accepted a model that no GPU of the host could ever hold."""
    cfg = config(tmp_path, {"qwen": {"memory": "20GiB"}, "small": {"memory": "8GiB"}})
    nvml = FakeNvml([FakeGpu(UUID0, total=16 * GiB)])

    assert check_devices(cfg, nvml=nvml) == [
        'models.qwen.memory: 20.0GiB exceeds device "0" total 16.0GiB - headroom 1.0GiB '
        "(measured through NVML)"
    ]


def test_check_config_reports_models_too_big_for_the_hosts_gpus(tmp_path: Path) -> None:
    """`vllmd check-config` calls check_config(path): the NVML check is part of it."""
    path = tmp_path / "vllmd.toml"
    path.write_text(
        '[scheduler]\nheadroom = "2GiB"\n'
        '[models.a]\nmodel = "org/a"\nmemory = "15GiB"\ndevices = ["0", "1"]\n'
    )
    nvml = FakeNvml([FakeGpu(UUID0, total=24 * GiB), FakeGpu(UUID1, total=16 * GiB)])

    assert check_config(path, nvml=nvml) == [
        'models.a.memory: 15.0GiB exceeds device "1" total 16.0GiB - headroom 2.0GiB '
        "(measured through NVML)"
    ]


def test_model_that_fits_up_to_the_headroom_passes(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"a": {"memory": "15GiB"}})

    assert check_devices(cfg, nvml=FakeNvml([FakeGpu(UUID0, total=16 * GiB)])) == []


@pytest.mark.parametrize("error", ["NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"])
def test_without_a_driver_the_check_is_skipped_silently(
    tmp_path: Path, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, {"huge": {"memory": "1000GiB"}})
    with capture_logs() as logs:
        found = check_devices(cfg, nvml=FakeNvml(init_error=getattr(FakeNvml, error)))

    assert found == []
    assert logs == []
    assert capsys.readouterr() == ("", "")


def test_real_pynvml_never_raises(tmp_path: Path) -> None:
    """This machine has no NVIDIA driver; on one that has, a 2 GiB model fits any GPU."""
    cfg = config(tmp_path, {"a": {"memory": "2GiB"}})

    assert check_devices(cfg) == []


def test_gpu_that_is_down_or_absent_is_not_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, {"a": {"memory": "50GiB"}, "b": {"memory": "50GiB", "devices": ["3"]}})
    lost = FakeGpu(UUID0, total=16 * GiB, error=FakeNvml.NVMLError_GpuIsLost)

    assert check_devices(cfg, nvml=FakeNvml([lost])) == []
    assert capsys.readouterr() == ("", "")


def test_hung_gpu_is_not_checked(tmp_path: Path) -> None:
    release = threading.Event()
    hung = FakeGpu(UUID0, total=16 * GiB, hang=release)
    cfg = config(tmp_path, {"a": {"memory": "50GiB"}})
    try:
        devices = anyio.run(lambda: read_devices(cfg, nvml=FakeNvml([hung]), timeout=0.5))
    finally:
        release.set()

    assert not devices["0"].up
    assert device_problems(cfg, devices) == []


def test_gpu_declared_by_index_is_checked_against_nvmls_total(tmp_path: Path) -> None:
    """A declared memory above the GPU's real total does not hide it."""
    cfg = config(
        tmp_path,
        {"a": {"memory": "50GiB"}, "b": {"memory": "30GiB", "devices": ["big"]}},
        devices={"0": {"memory": "100GiB"}, "big": {"uuid": UUID1}},
    )
    nvml = FakeNvml([FakeGpu(UUID0, total=40 * GiB), FakeGpu(UUID1, total=24 * GiB)])

    assert check_devices(cfg, nvml=nvml) == [
        'models.a.memory: 50.0GiB exceeds device "0" total 40.0GiB - headroom 1.0GiB '
        "(measured through NVML)",
        'models.b.memory: 30.0GiB exceeds device "big" total 24.0GiB - headroom 1.0GiB '
        "(measured through NVML)",
    ]


def test_declared_budget_below_the_gpus_total_is_left_to_parsing(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"a": {"memory": "20GiB"}}, devices={"0": {"memory": "30GiB"}})

    assert check_devices(cfg, nvml=FakeNvml([FakeGpu(UUID0, total=80 * GiB)])) == []


def test_cpu_only_config_does_not_touch_nvml(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        {"a": {"memory": "4GiB", "devices": ["cpu0"]}},
        devices={"cpu0": {"kind": "cpu", "memory": "8GiB"}},
    )
    nvml = FakeNvml([FakeGpu(UUID0, total=GiB)])

    assert check_devices(cfg, nvml=nvml) == []
    assert nvml.init_threads == []
