"""Cores of cpu devices in the config: `[devices.X] cpus`, `[models.X] cpus`, and the engine
variables vllmd owns for them (config/cpus.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.config_files import problems, write
from vllmd.config import load_config
from vllmd.config.cpus import cpulist, default_cpus, parse_cpulist
from vllmd.config.diff import plan_reload

ALLOWED = sorted(os.sched_getaffinity(0))
CPU = '[devices.cpu0]\nkind = "cpu"\nmemory = "64GiB"\n'


def model(name: str = "m", extra: str = "", devices: str = '["cpu0"]') -> str:
    return f'[models.{name}]\nmodel = "org/{name}"\nmemory = "4GiB"\ndevices = {devices}\n{extra}'


@pytest.mark.parametrize(
    ("value", "cores"),
    [("0-3,8", (0, 1, 2, 3, 8)), ("2", (2,)), ("1, 3-4", (1, 3, 4)), ([3, 1, 1], (1, 3))],
)
def test_a_core_list_is_a_cpulist_or_an_array(value: object, cores: tuple[int, ...]) -> None:
    assert parse_cpulist(value) == cores
    assert parse_cpulist(cpulist(cores)) == cores


@pytest.mark.parametrize("value", ["", "a", "3-1", "1-", "-1", []])
def test_a_bad_core_list_is_refused(value: object) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(value)


def test_the_default_keeps_one_core_for_the_daemon_beyond_two() -> None:
    assert default_cpus({0, 1}) == (0, 1)
    assert default_cpus({0, 1, 2, 3}) == (1, 2, 3)
    assert default_cpus({5}) == (5,)


def test_a_cpu_device_defaults_to_the_cores_vllmd_may_use(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CPU + model()))
    assert config.devices["cpu0"].cpus == default_cpus()
    assert config.models["m"].cores == 1 and config.models["m"].cpus is None


def test_declared_cores_must_be_the_daemons_own(tmp_path: Path) -> None:
    outside = max(ALLOWED) + 1
    text = CPU.replace('"64GiB"\n', f'"64GiB"\ncpus = [{ALLOWED[0]}, {outside}]\n') + model()
    assert problems(tmp_path, text) == [
        f"devices.cpu0.cpus: cores [{outside}] are not among those this process may use "
        f"({cpulist(ALLOWED)})"
    ]


def test_a_gpu_has_no_cores_to_give(tmp_path: Path) -> None:
    text = '[devices.g]\nuuid = "GPU-1"\ncpus = "0"\n' + model(devices='["g"]')
    assert problems(tmp_path, text) == [
        "devices.g.cpus: only cpu devices have cores to give engines"
    ]


def test_a_model_wanting_more_cores_than_its_device_has_names_cpus(tmp_path: Path) -> None:
    text = CPU.replace('"64GiB"\n', f'"64GiB"\ncpus = "{ALLOWED[0]}"\n') + model(extra="cpus = 2\n")
    assert problems(tmp_path, text) == [
        f'models.m.cpus: 2 cores, but device "cpu0" has 1 ({ALLOWED[0]})'
    ]


def test_cpus_on_a_gpu_model_is_refused(tmp_path: Path) -> None:
    text = model(extra="cpus = 2\n", devices='["0"]')
    assert problems(tmp_path, text) == ["models.m.cpus: only models on cpu devices get cores"]


@pytest.mark.parametrize("name", ["VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"])
def test_the_binding_variables_are_vllmds(tmp_path: Path, name: str) -> None:
    engine = f'[engine]\nenv = {{ {name} = "auto" }}\n'
    in_model = model(extra=f'env = {{ {name} = "0" }}\n')
    assert problems(tmp_path, engine + CPU + in_model) == [
        f"engine.env: {name} is set by vllmd (each cpu engine's own cores); remove it",
        f"models.m.env: {name} is set by vllmd (each cpu engine's own cores); remove it",
    ]


def test_a_change_of_cpus_restarts_the_model(tmp_path: Path) -> None:
    old = load_config(write(tmp_path, CPU + model()))
    new = load_config(write(tmp_path, CPU + model(extra="cpus = 1\n")))
    assert plan_reload(old, new).restart == ("m",)
