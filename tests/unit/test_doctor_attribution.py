"""doctor's "GPU attribution" check: the daemon's finding first, then NVML as seen from here."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest

from tests.fakes.fake_gpu import HOST_PID_OFFSET
from vllmd.cli.doctor import attribution_check
from vllmd.devices import DeviceSnapshot
from vllmd.devices.snapshot import GpuProcess, unmeasured
from vllmd.placement.ledger import NO_FIGURES, PID_NAMESPACE

GiB = 2**30


def _gpu(*processes: GpuProcess) -> dict[str, DeviceSnapshot]:
    snap = unmeasured("0", "gpu", up=True, total=80 * GiB)
    return {"0": replace(snap, used=2 * GiB, free=78 * GiB, processes=processes)}


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
