"""Device probes: NVML readings through a fake pynvml, declared devices, process memory."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import anyio
import psutil
import pytest
from structlog.testing import capture_logs

from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, NVMLError
from vllmd.devices import (
    CompositeProbe,
    DeclaredProbe,
    GpuProcess,
    NvmlProbe,
    measure_pss,
    measure_rss,
    process_tree_pss,
    process_tree_rss,
)

pytestmark = pytest.mark.anyio

GiB = 2**30
UUID0 = "GPU-00000000-aaaa-bbbb-cccc-000000000000"
UUID1 = "GPU-11111111-aaaa-bbbb-cccc-111111111111"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event a fake GPU hangs on; set at teardown so the abandoned thread ends."""
    event = threading.Event()
    yield event
    event.set()


@dataclass(frozen=True)
class Declared:
    """Stands in for vllmd.config's DeviceConfig."""

    name: str
    kind: Literal["cpu", "gpu"]
    memory: int | None = None
    uuid: str | None = None


async def test_snapshot_maps_memory_utilization_temperature_and_power() -> None:
    gpu = FakeGpu(
        UUID0,
        total=80 * GiB,
        used=3 * GiB,
        utilization_percent=42,
        temperature=61,
        power_milliwatts=250_500,
    )
    snapshot = await NvmlProbe(FakeNvml([gpu, FakeGpu(UUID1)])).snapshot()

    assert list(snapshot) == ["0", "1"]
    reading = snapshot["0"]
    assert (reading.kind, reading.uuid, reading.index) == ("gpu", UUID0, 0)
    assert (reading.total, reading.used, reading.free) == (80 * GiB, 3 * GiB, 77 * GiB)
    assert reading.device_total == 80 * GiB
    assert reading.utilization == pytest.approx(0.42)
    assert reading.temperature == 61.0
    assert reading.power == pytest.approx(250.5)  # milliwatts -> watts
    assert reading.up and reading.error is None
    assert snapshot["1"].uuid == UUID1


MiB = 2**20
H100_V1_TOTAL = 81559 * MiB  # an H100 80GB as NVML's v1 reports it
H100_RESERVED = 600 * MiB


async def test_memory_is_cudas_view_from_nvml_v2() -> None:
    """NVML v2 gives the driver's reserved part apart: CUDA's total (what vLLM's fraction is
    of) is total - reserved; v2's used is allocated memory only."""
    gpu = FakeGpu(UUID0, total=H100_V1_TOTAL, reserved=H100_RESERVED, used=3 * GiB)
    reading = (await NvmlProbe(FakeNvml([gpu])).snapshot())["0"]
    cuda_total = H100_V1_TOTAL - H100_RESERVED
    assert (reading.total, reading.device_total, reading.reserved) == (
        cuda_total,
        cuda_total,
        H100_RESERVED,
    )
    assert (reading.used, reading.free) == (3 * GiB, cuda_total - 3 * GiB)


async def test_a_v1_driver_derives_the_reserved_part_from_an_idle_reading_and_says_so() -> None:
    """Without nvmlDeviceGetMemoryInfo_v2, v1's used includes the reserved part: an idle
    reading (no process) shows it whole; later readings keep it out of used and total."""
    gpu = FakeGpu(UUID0, total=H100_V1_TOTAL, reserved=H100_RESERVED, used=0)
    probe = NvmlProbe(FakeNvml([gpu], memory_v2=False))
    with capture_logs() as logs:
        idle = (await probe.snapshot())["0"]
    assert idle.reserved == H100_RESERVED and idle.total == H100_V1_TOTAL - H100_RESERVED
    assert idle.used == 0
    assert [e["event"] for e in logs] == ["nvml_memory_v1"]
    gpu.used, gpu.processes = 10 * GiB, ((4242, 10 * GiB),)
    with capture_logs() as logs:
        busy = (await probe.snapshot())["0"]
    assert (busy.total, busy.used, busy.reserved) == (idle.total, 10 * GiB, H100_RESERVED)
    assert logs == []  # said once


async def test_a_v1_reading_with_unknown_process_memory_keeps_the_lowest_estimate() -> None:
    gpu = FakeGpu(UUID0, total=H100_V1_TOTAL, reserved=H100_RESERVED, used=0)
    probe = NvmlProbe(FakeNvml([gpu], memory_v2=False))
    await probe.snapshot()
    gpu.used, gpu.processes = 5 * GiB, ((4242, None),)  # WDDM-like: no per-process figure
    reading = (await probe.snapshot())["0"]
    assert reading.reserved == H100_RESERVED and reading.used == 5 * GiB


@pytest.mark.parametrize("driver", ["v3", "v2", "plain"])
async def test_compute_processes_fall_back_to_older_nvml_calls(driver: str) -> None:
    """_v3 is missing on old drivers (FunctionNotFound) and on old pynvml (no attribute)."""
    gpu = FakeGpu(UUID0, processes=[(101, 5 * GiB), (102, None)])
    snapshot = await NvmlProbe(FakeNvml([gpu], driver=driver)).snapshot()  # type: ignore[arg-type]

    assert snapshot["0"].processes == (GpuProcess(101, 5 * GiB), GpuProcess(102, None))
    assert snapshot["0"].error is None


async def test_unsupported_fields_are_none_and_named_in_error() -> None:
    gpu = FakeGpu(UUID0, unsupported=frozenset({"power", "temperature", "utilization"}))
    reading = (await NvmlProbe(FakeNvml([gpu])).snapshot())["0"]

    assert (reading.power, reading.temperature, reading.utilization) == (None, None, None)
    assert reading.up and reading.used == gpu.used
    assert reading.error == "unsupported: utilization, temperature, power"


async def test_the_device_type_is_nvmls_name_or_unknown() -> None:
    """NVML's product name is the device type a learned GPU overhead belongs to."""
    named = FakeGpu(UUID0, name="NVIDIA A100-SXM4-80GB")
    unnamed = FakeGpu(UUID1, unsupported=frozenset({"name"}))
    snapshot = await NvmlProbe(FakeNvml([named, unnamed])).snapshot()
    assert snapshot["0"].product == "NVIDIA A100-SXM4-80GB"
    assert snapshot["1"].product is None and snapshot["1"].up


async def test_unsupported_process_list_leaves_device_up() -> None:
    gpu = FakeGpu(UUID0, unsupported=frozenset({"processes"}))
    reading = (await NvmlProbe(FakeNvml([gpu])).snapshot())["0"]

    assert reading.up and reading.processes == ()
    assert reading.error == "unsupported: processes"
    assert reading.processes_listed is False  # not read as "no process on the GPU"


async def test_an_empty_process_list_is_a_listed_one() -> None:
    """No compute process is an answer, unlike NOT_SUPPORTED: kept apart in the reading."""
    idle, busy = FakeGpu(UUID0), FakeGpu(UUID1, processes=[(101, GiB)])
    snapshot = await NvmlProbe(FakeNvml([idle, busy])).snapshot()
    assert snapshot["0"].processes == () and snapshot["0"].processes_listed
    assert snapshot["1"].processes_listed and snapshot["0"].error is None


@pytest.mark.parametrize("error", ["NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"])
async def test_missing_driver_gives_no_devices_and_one_warning(error: str) -> None:
    nvml = FakeNvml([FakeGpu(UUID0)], init_error=getattr(FakeNvml, error))
    with capture_logs() as logs:
        probe = NvmlProbe(nvml)
        assert await probe.snapshot() == {}
        assert await probe.snapshot() == {}

    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [w["event"] for w in warnings] == ["no NVIDIA driver: only declared devices are used"]
    assert len(nvml.init_threads) == 1  # not retried


async def test_nvml_is_initialised_once_in_a_worker_thread_and_shut_down() -> None:
    nvml = FakeNvml([FakeGpu(UUID0)])
    probe = NvmlProbe(nvml)
    await probe.snapshot()
    await probe.snapshot()

    assert len(nvml.init_threads) == 1
    assert nvml.init_threads[0] != threading.get_ident()
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1


async def test_hanging_device_is_down_within_the_timeout(release: threading.Event) -> None:
    hung = FakeGpu(UUID1, hang=release)
    nvml = FakeNvml([FakeGpu(UUID0), hung])
    # Roomy enough that the healthy GPU answers even on a loaded machine; the hung one still
    # costs only the timeout.
    probe = NvmlProbe(nvml, timeout=1.0)

    with capture_logs() as logs:
        started = time.monotonic()
        snapshot = await probe.snapshot()
        assert time.monotonic() - started < 3.0
        assert snapshot["0"].up
        assert not snapshot["1"].up and snapshot["1"].index == 1
        assert "did not answer within 1 s" in (snapshot["1"].error or "")

        # The stuck call still holds its thread: the device is not asked again meanwhile.
        again = await probe.snapshot()
        assert not again["1"].up and "not returned yet" in (again["1"].error or "")
        assert hung.memory_calls == 1

    assert [e["device"] for e in logs if e["event"] == "gpu down"] == ["1"]  # logged once


async def test_concurrent_snapshots_both_see_the_gpus() -> None:
    """Regression: a second caller must not mistake the first one's calls for a hang."""
    probe = NvmlProbe(FakeNvml([FakeGpu(UUID0)]))
    results = []

    async def take() -> None:
        results.append(await probe.snapshot())

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        tg.start_soon(take)

    assert [r["0"].up for r in results] == [True, True]


async def test_hung_device_comes_back_when_its_call_returns(release: threading.Event) -> None:
    hung = FakeGpu(UUID0, hang=release)
    probe = NvmlProbe(FakeNvml([hung]), timeout=1.0)
    assert not (await probe.snapshot())["0"].up

    hung.hang = None
    release.set()
    for _ in range(300):  # the abandoned thread finishes on its own schedule
        if (reading := (await probe.snapshot())["0"]).up:
            break
        await anyio.sleep(0.01)
    assert reading.up and reading.uuid == UUID0


async def test_hanging_discovery_reports_known_gpus_down(release: threading.Event) -> None:
    nvml = FakeNvml([FakeGpu(UUID0)])
    probe = NvmlProbe(nvml, timeout=1.0)
    assert (await probe.snapshot())["0"].up

    nvml.count_hang = release
    with capture_logs() as logs:
        snapshot = await probe.snapshot()
        await probe.snapshot()

    assert not snapshot["0"].up and snapshot["0"].uuid == UUID0
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "gpu discovery failed",
        "gpu down",
    ]


async def test_nvml_error_downs_only_that_device() -> None:
    lost = FakeGpu(UUID1, error=FakeNvml.NVMLError_GpuIsLost)
    snapshot = await NvmlProbe(FakeNvml([FakeGpu(UUID0), lost])).snapshot()

    assert snapshot["0"].up
    assert not snapshot["1"].up
    assert "NVMLError_GpuIsLost" in (snapshot["1"].error or "")


async def test_declared_gpu_takes_the_reading_of_its_uuid_under_its_name() -> None:
    nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1, used=7 * GiB)])
    declared = DeclaredProbe({"big": Declared("big", "gpu", uuid=UUID1.lower())})
    snapshot = await CompositeProbe(NvmlProbe(nvml), declared).snapshot()

    assert set(snapshot) == {"0", "big"}  # "1" is not listed twice
    big = snapshot["big"]
    assert (big.name, big.uuid, big.index, big.used, big.up) == ("big", UUID1, 1, 7 * GiB, True)


async def test_declared_gpu_that_hangs_is_down_under_its_name_only(
    release: threading.Event,
) -> None:
    gpu = FakeGpu(UUID1)
    declared = DeclaredProbe({"big": Declared("big", "gpu", uuid=UUID1)})
    probe = CompositeProbe(NvmlProbe(FakeNvml([gpu]), timeout=1.0), declared)
    assert (await probe.snapshot())["big"].up

    gpu.hang = release
    with capture_logs():
        snapshot = await probe.snapshot()

    assert list(snapshot) == ["big"]
    assert not snapshot["big"].up and snapshot["big"].uuid == UUID1


async def test_declared_gpu_memory_caps_its_total() -> None:
    declared = DeclaredProbe({"half": Declared("half", "gpu", memory=40 * GiB, uuid=UUID0)})
    snapshot = await CompositeProbe(NvmlProbe(FakeNvml([FakeGpu(UUID0)])), declared).snapshot()

    assert snapshot["half"].total == 40 * GiB
    assert snapshot["half"].device_total == 80 * GiB


async def test_declared_gpu_without_a_discovered_uuid_is_down() -> None:
    declared = DeclaredProbe({"big": Declared("big", "gpu", uuid=UUID1)})
    nvml = FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound)
    with capture_logs():
        snapshot = await CompositeProbe(NvmlProbe(nvml), declared).snapshot()

    assert list(snapshot) == ["big"]
    assert not snapshot["big"].up and UUID1 in (snapshot["big"].error or "")


async def test_gpu_declared_by_index_takes_the_discovered_gpu_of_that_index() -> None:
    """Regression: `[devices."0"] memory = ...` (no uuid) was reported down and replaced the
    NVML reading, so every model on it waited forever."""
    nvml = FakeNvml([FakeGpu(UUID0, total=80 * GiB, used=3 * GiB), FakeGpu(UUID1)])
    declared = DeclaredProbe({"0": Declared("0", "gpu", memory=40 * GiB)})
    snapshot = await CompositeProbe(NvmlProbe(nvml), declared).snapshot()

    assert set(snapshot) == {"0", "1"}
    gpu = snapshot["0"]
    assert gpu.up and gpu.error is None
    assert (gpu.uuid, gpu.index, gpu.total, gpu.used) == (UUID0, 0, 40 * GiB, 3 * GiB)
    assert gpu.device_total == 80 * GiB  # vLLM's fraction is of this, not of the budget
    assert snapshot["1"].uuid == UUID1 and snapshot["1"].total == 80 * GiB


async def test_gpu_declared_by_index_without_a_memory_cap_keeps_the_measured_total() -> None:
    declared = DeclaredProbe({"1": Declared("1", "gpu")})
    nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1, total=24 * GiB)])
    snapshot = await CompositeProbe(NvmlProbe(nvml), declared).snapshot()

    assert snapshot["1"].up and snapshot["1"].total == 24 * GiB and snapshot["1"].uuid == UUID1


@pytest.mark.parametrize("gpus", [0, 1], ids=["no-driver", "one-gpu"])
async def test_gpu_declared_by_an_index_nvml_does_not_have_is_down_with_a_clear_error(
    gpus: int,
) -> None:
    nvml = (
        FakeNvml([FakeGpu(UUID0)])
        if gpus
        else FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound)
    )
    declared = DeclaredProbe({"3": Declared("3", "gpu", memory=40 * GiB)})
    with capture_logs():
        snapshot = await CompositeProbe(NvmlProbe(nvml), declared).snapshot()

    assert not snapshot["3"].up
    assert snapshot["3"].error == f"no GPU with NVML index 3 found ({gpus} discovered)"
    assert snapshot["3"].index == 3 and snapshot["3"].uuid is None


async def test_gpu_declared_by_index_that_hangs_is_down_and_listed_once(
    release: threading.Event,
) -> None:
    gpu = FakeGpu(UUID0)
    declared = DeclaredProbe({"0": Declared("0", "gpu", memory=40 * GiB)})
    probe = CompositeProbe(NvmlProbe(FakeNvml([gpu]), timeout=1.0), declared)
    assert (await probe.snapshot())["0"].up

    gpu.hang = release
    with capture_logs():
        snapshot = await probe.snapshot()

    assert list(snapshot) == ["0"]
    assert not snapshot["0"].up and "did not answer" in (snapshot["0"].error or "")
    assert snapshot["0"].uuid == UUID0  # remembered from the last good reading


async def test_declared_cpu_device_reports_configured_memory_and_host_cpu() -> None:
    probe = DeclaredProbe({"cpu0": Declared("cpu0", "cpu", memory=12 * GiB)})
    first = (await probe.snapshot())["cpu0"]
    second = (await probe.snapshot())["cpu0"]

    assert (first.kind, first.total, first.used, first.up) == ("cpu", 12 * GiB, None, True)
    assert first.utilization is None  # nothing to compare with yet
    assert second.utilization is not None and 0.0 <= second.utilization <= 1.0
    assert (second.temperature, second.power, second.processes) == (None, None, ())


async def test_declared_cpu_device_without_memory_uses_host_ram() -> None:
    snapshot = await DeclaredProbe({"cpu0": Declared("cpu0", "cpu")}).snapshot()

    assert snapshot["cpu0"].total == psutil.virtual_memory().total


@pytest.fixture
def process_pair() -> Iterator[tuple[int, int]]:
    """A sleeping process with a sleeping child, both loaded: (parent pid, child pid)."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', "
        "'import time; print(\"ready\", flush=True); time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    assert parent.stdout is not None
    try:
        assert parent.stdout.readline() == b"ready\n"
        (child,) = psutil.Process(parent.pid).children()
        yield parent.pid, child.pid
    finally:
        os.killpg(parent.pid, 9)
        parent.wait()
        parent.stdout.close()


async def test_process_tree_rss_includes_descendants(process_pair: tuple[int, int]) -> None:
    parent, child = process_pair
    parent_rss = psutil.Process(parent).memory_info().rss
    child_rss = psutil.Process(child).memory_info().rss

    assert child_rss > 0
    assert process_tree_rss(parent) >= parent_rss + child_rss * 0.9
    assert await measure_rss(parent) > parent_rss
    assert process_tree_rss(os.getpid()) > psutil.Process().memory_info().rss


def test_process_tree_pss_counts_shared_pages_once() -> None:
    """Two forked children share their parent's 256 MiB copy-on-write: the tree's RSS counts
    it three times, its PSS (smaps_rollup) once, as the kernel splits shared pages."""
    block = 256 * 2**20
    script = (
        "import os, sys, time\n"
        f"data = bytearray({block})\n"
        "for i in range(0, len(data), 4096): data[i] = 1\n"
        "for _ in range(2):\n"
        "    if os.fork() == 0: time.sleep(60); os._exit(0)\n"
        "time.sleep(1); print('ready', flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    assert parent.stdout is not None
    try:
        assert parent.stdout.readline() == b"ready\n"
        rss, pss = process_tree_rss(parent.pid), process_tree_pss(parent.pid)
        assert rss > 3 * block
        assert block < pss < 1.5 * block
        assert abs(anyio.run(measure_pss, parent.pid) - pss) < 16 * 2**20
    finally:
        os.killpg(parent.pid, 9)
        parent.wait()
        parent.stdout.close()


def test_process_tree_pss_of_a_missing_process_is_zero() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    assert process_tree_pss(gone.pid) == 0


def test_process_tree_rss_of_a_missing_process_is_zero() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    assert process_tree_rss(gone.pid) == 0


async def test_real_pynvml_without_a_driver_never_raises() -> None:
    """On this machine (no NVIDIA driver) the real pynvml raises NVMLError_LibraryNotFound."""
    with capture_logs() as logs:
        probe = NvmlProbe(timeout=10)
        snapshot = await probe.snapshot()
        probe.close()
    if snapshot:
        pytest.skip("an NVIDIA driver is present")
    assert [e["event"] for e in logs] == ["no NVIDIA driver: only declared devices are used"]
    assert "LibraryNotFound" in logs[0]["reason"] or "DriverNotLoaded" in logs[0]["reason"]


def test_fake_errors_carry_nvml_codes() -> None:
    assert FakeNvml.NVMLError_NotSupported().value == FakeNvml.NVML_ERROR_NOT_SUPPORTED
    assert issubclass(FakeNvml.NVMLError_LibraryNotFound, NVMLError)


async def test_a_mig_gpu_is_reported_down_with_the_reason_and_never_measured() -> None:
    """MIG GPUs' queries on the parent handle are aggregates and vLLM fails on MIG UUIDs: the
    GPU is down (no model is placed there) with a named reason; a GPU without MIG support
    (NVML_ERROR_NOT_SUPPORTED) is an ordinary GPU."""
    mig = FakeGpu(UUID0, mig=True)
    old = FakeGpu(UUID1, unsupported=frozenset({"mig"}))
    with capture_logs() as logs:
        snapshot = await NvmlProbe(FakeNvml([mig, old])).snapshot()
    assert snapshot["0"].up is False and "MIG mode is enabled" in (snapshot["0"].error or "")
    assert snapshot["0"].uuid == UUID0 and mig.memory_calls == 0
    assert snapshot["1"].up is True
    assert [e["device"] for e in logs if e["event"] == "gpu down"] == ["0"]


async def test_a_v1_driver_without_a_process_list_derives_no_reserved_part() -> None:
    """Regression: without compute processes (NotSupported) every byte in use looked
    unattributed, and all of it became the "reserved" part (CUDA's total halved)."""
    gpu = FakeGpu(
        UUID0,
        total=H100_V1_TOTAL,
        reserved=H100_RESERVED,
        used=40 * GiB,
        unsupported=frozenset({"processes"}),
    )
    probe = NvmlProbe(FakeNvml([gpu], memory_v2=False))
    with capture_logs() as logs:
        for _ in range(3):
            reading = (await probe.snapshot())["0"]
    assert reading.reserved == 0 and reading.total == H100_V1_TOTAL
    assert [e["event"] for e in logs].count("nvml_memory_v1") == 1  # said once, not per reading
