"""doctor's "GPU attribution" check: the daemon's finding first, then NVML as seen from here."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest

from tests.fakes.fake_gpu import HOST_PID_OFFSET
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml
from vllmd.cli.doctor import attribution_check
from vllmd.devices import DeviceSnapshot, NvmlProbe
from vllmd.devices.snapshot import GpuProcess, unmeasured
from vllmd.placement.ledger import NO_FIGURES, NO_PROCESS_LIST, PID_NAMESPACE

GiB = 2**30


def _gpu(*processes: GpuProcess, name: str = "0") -> dict[str, DeviceSnapshot]:
    snap = unmeasured(name, "gpu", up=True, total=80 * GiB)
    return {name: replace(snap, used=2 * GiB, free=78 * GiB, processes=processes)}


def _unlisted(name: str = "0") -> dict[str, DeviceSnapshot]:
    """A GPU whose driver cannot list compute processes (NVML's NOT_SUPPORTED)."""
    (snap,) = _gpu(name=name).values()
    return {name: replace(snap, processes_listed=False, error="unsupported: processes")}


def _status(unseen: dict[str, str] | None) -> dict[str, Any]:
    return {"devices": [{"name": "0", "kind": "gpu", "up": True, "pids_unseen": unseen}]}


def test_the_daemons_finding_of_a_pid_namespace_fails_with_the_fix() -> None:
    unseen = {"why": "pid_namespace", "cause": PID_NAMESPACE.cause, "fix": PID_NAMESPACE.fix}
    check = attribution_check(_status(unseen), _gpu(GpuProcess(os.getpid(), GiB)))
    assert check.status == "FAIL"
    assert "GPU 0" in check.detail and "budgeted by reservation" in check.detail
    assert "--pid=host" in check.fix


def test_no_per_process_figures_is_a_warning() -> None:
    unseen = {"why": "no_figures", "cause": NO_FIGURES.cause, "fix": NO_FIGURES.fix}
    assert attribution_check(_status(unseen), {}).status == "WARN"
    assert attribution_check(None, _gpu(GpuProcess(os.getpid(), None))).status == "WARN"


@pytest.mark.parametrize(
    ("pids", "status"),
    [
        ((HOST_PID_OFFSET + 17, HOST_PID_OFFSET + 18), "FAIL"),  # none of them exists here
        ((HOST_PID_OFFSET + 17, os.getpid()), "PASS"),  # one does: this namespace sees them
        ((), "PASS"),  # nothing to attribute
    ],
)
def test_nvml_seen_from_here(pids: tuple[int, ...], status: str) -> None:
    check = attribution_check(_status(None), _gpu(*(GpuProcess(p, GiB) for p in pids)))
    assert check.status == status, check
    if status == "FAIL":
        assert "pid namespace" in check.detail and "--pid=host" in check.fix


def test_the_daemons_finding_of_no_process_list_is_a_warning_without_pid_host() -> None:
    """A driver that cannot list compute processes (some vGPU/cloud drivers) is no pid
    namespace: budgeted by reservation, nothing to change in the unit."""
    unseen = {"why": "no_process_list", "cause": NO_PROCESS_LIST.cause, "fix": NO_PROCESS_LIST.fix}
    check = attribution_check(_status(unseen), _unlisted())
    assert check.status == "WARN", check
    assert "does not list compute processes" in check.detail
    assert "GPU 0" in check.detail and "budgeted by reservation" in check.detail
    assert "--pid=host" not in check.fix
    assert "nothing to fix in vllmd's unit" in check.fix


@pytest.mark.anyio
async def test_a_driver_that_cannot_list_processes_warns_without_the_daemons_finding() -> None:
    """Defect: NOT_SUPPORTED from nvmlDeviceGetComputeRunningProcesses read as an empty GPU,
    and doctor PASSed with "no compute process on a GPU to attribute"."""
    nvml = FakeNvml([FakeGpu("GPU-0", unsupported=frozenset({"processes"}))])
    gpus = await NvmlProbe(nvml).snapshot()
    for status in (None, _status(None)):
        check = attribution_check(status, gpus)
        assert check.status == "WARN", check
        assert check.detail.startswith("GPU 0: the driver does not list compute processes")
        assert "budgeted by reservation" in check.detail
        assert check.fix == NO_PROCESS_LIST.fix  # the daemon's words for it


def test_an_empty_process_list_still_passes() -> None:
    check = attribution_check(None, {**_gpu(), **_gpu(GpuProcess(os.getpid(), GiB), name="1")})
    assert check.status == "PASS", check


def test_a_pid_namespace_still_fails_beside_a_gpu_without_a_process_list() -> None:
    foreign = _gpu(GpuProcess(HOST_PID_OFFSET + 17, GiB), name="1")
    check = attribution_check(None, {**_unlisted(), **foreign})
    assert check.status == "FAIL", check
    assert "pid namespace" in check.detail and "--pid=host" in check.fix
