"""A fake GPU whose memory and compute processes follow the fake engines.

The fake driver is a directory (`FAKE_GPU_DIR`) shared by the test and the fake engines:

- `gpu.json`: the devices (name, uuid, total) and how the driver releases memory; written by
  `FakeGpu`, read by the engines;
- `proc-<pid>.json`: one process holding memory on one device, `{"pid", "created", "device",
  "bytes", "model", "engine", "foreign", "dead_at"}`.

Each device has a part the driver and firmware reserve (NVML v2's `reserved`, outside CUDA's
total: `total - reserved` is what CUDA and vLLM see; an H100 80GB reads 81559 MiB in v1 with
~600 MiB reserved).

Engine side (`WorkerMemory`, used by tests/fakes/fake_engine.py when FAKE_GPU_DIR is set): like
vLLM, the memory is held by a Worker process, a child of the API server in its process group
(one per GPU in CUDA_VISIBLE_DEVICES), not by the API server itself. As in vLLM's
`Worker.init_device` (vllm/v1/worker/gpu_worker.py), the worker first creates its CUDA context
(and NCCL's buffers): that memory is held before anything is measured. Then
`request_memory` (vllm/v1/worker/utils.py) asks for ceil(F x CUDA's total), F being
`--gpu-memory-utilization`, and refuses to start when CUDA's free memory (after the context)
is below it, with vLLM's message. So the engine's footprint is context + F x total: the
context lies outside the fraction. The worker takes its share after FAKE_GPU_ALLOC_DELAY
seconds (vLLM allocates after loading and profiling, while /health still refuses
connections); /sleep leaves a residue on the GPU, /wake_up takes the full share again.

Test side (`FakeGpu`, a vllmd `DeviceProbe`): reads the directory at each snapshot. Memory of
a process that has exited is released the way a driver does it: its pid stays in the
compute-process list, with its memory, for `release_lag` seconds after it was first seen dead,
then the memory stays used (unattributed) for `free_lag` more seconds, then it is free.
Foreign processes (not vllmd's) are added with `add_foreign`. Two of NVML's ways of not
attributing memory: `pids="namespace"` lists every process under another pid (NVML answers in
the host's pid namespace, which a container's vllmd cannot see: NVIDIA/nvidia-docker#1483),
`pids="wddm"` lists them without figures (`usedGpuMemory` not available, as under WDDM/WSL).

Environment of a fake engine:
  FAKE_GPU_DIR          the driver directory (FakeGpu.env() gives it).
  FAKE_GPU_ALLOC_DELAY  seconds from start until the worker holds its memory (default 0.1).
  FAKE_GPU_BYTES        bytes the worker holds per device once allocated, context included
                        (default: context + ceil(utilization x CUDA's total)).
  FAKE_GPU_RESIDUE_L1   bytes left on the GPU by a level-1 sleep (default 1 GiB), and
  FAKE_GPU_RESIDUE_L2   by a level-2 sleep (default 1 GiB).
  FAKE_GPU_CHECK_FREE   0: skip vLLM's free-memory check at startup (default 1).
  FAKE_GPU_WEIGHTS_BYTES  the model's loaded weights (default 64 MiB): what a level-1 sleep
                        copies to host RAM, split among the workers (tensor parallel shards).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import psutil

from vllmd.devices import DeviceSnapshot, GpuProcess

GiB = 2**30
MiB = 2**20
DEFAULT_RESIDUE = GiB  # a real sleeper keeps its CUDA context and graph pools: 1-7 GB
DEFAULT_WEIGHTS = 64 * 2**20
DRIVER_FILE = "gpu.json"
# Above Linux's largest possible pid (PID_MAX_LIMIT = 2**22): never a real process.
FOREIGN_PID_BASE = 5_000_000
HOST_PID_OFFSET = 10_000_000  # pids as the host's namespace would number them (fake)
# A worker: holds host RAM while asleep at level 1, as vLLM's does (vllm/device_allocator/
# cumem.py `CuMemAllocator.sleep` copies every "weights" tensor to a pinned CPU buffer; `wake_up`
# copies it back and frees it). Commands on stdin, each answered "ok"; after its engine is gone
# (stdin closed) it lingers, as a worker does until its process group is killed.
WORKER = """
import sys, time
held = None
for line in sys.stdin:
    word, _, arg = line.partition(" ")
    held = bytearray(b"\\x01") * int(arg) if word == "hold" else None  # touched: resident
    sys.stdout.write("ok\\n")
    sys.stdout.flush()
time.sleep(3600)
"""


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    uuid: str
    total: int  # the whole device, as NVML's v1 total
    reserved: int = 0  # the driver's: NVML v2's `reserved`, never offered to CUDA

    @property
    def cuda_total(self) -> int:
        """What CUDA (torch.cuda.mem_get_info) and so vLLM see as the device's total."""
        return self.total - self.reserved


@dataclass(frozen=True, slots=True)
class Driver:
    """What gpu.json says: the devices and how memory of an exited process is released."""

    devices: tuple[Device, ...]
    release_lag: float = 0.0
    free_lag: float = 0.0
    context: int = 0  # what each engine's worker holds from its CUDA context on, per GPU

    def find(self, visible: str) -> Device | None:
        """A device by uuid, name or index, as CUDA_VISIBLE_DEVICES may name it."""
        for device in self.devices:
            if visible in (device.uuid, device.name):
                return device
        return None

    def dump(self) -> dict[str, Any]:
        return {
            "devices": [
                {"name": d.name, "uuid": d.uuid, "total": d.total, "reserved": d.reserved}
                for d in self.devices
            ],
            "release_lag": self.release_lag,
            "free_lag": self.free_lag,
            "context": self.context,
        }

    @staticmethod
    def load(data: Mapping[str, Any]) -> Driver:
        return Driver(
            devices=tuple(
                Device(d["name"], d["uuid"], int(d["total"]), int(d.get("reserved", 0)))
                for d in data["devices"]
            ),
            release_lag=float(data["release_lag"]),
            free_lag=float(data["free_lag"]),
            context=int(data.get("context", 0)),
        )


@dataclass(frozen=True, slots=True)
class Held:
    """One process's memory on one device, as the fake driver sees it now."""

    pid: int
    device: str
    bytes: int
    listed: bool  # in the compute-process list; False: exited, memory not yet released
    model: str | None = None
    engine: int | None = None  # the API server (engine leader) the worker belongs to
    foreign: bool = False


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _alive(pid: int, created: float | None) -> bool:
    """Whether the process still exists (a zombie has released its GPU memory: not alive;
    a pid reused by another process is not the same process)."""
    try:
        proc = psutil.Process(pid)
        if created is not None and abs(proc.create_time() - created) > 0.05:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def read_driver(directory: Path) -> tuple[Driver, list[Held]]:
    """The devices and every process's memory, now. Blocking (files, /proc). Marks processes
    found dead (`dead_at`) and removes those whose memory the driver has released."""
    driver = Driver.load(json.loads((directory / DRIVER_FILE).read_text(encoding="utf-8")))
    now = time.time()
    held: list[Held] = []
    for path in sorted(directory.glob("proc-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):  # removed meanwhile
            continue
        listed = True
        if not record.get("foreign") and not _alive(record["pid"], record.get("created")):
            dead_at = record.get("dead_at")
            if dead_at is None:
                dead_at = record["dead_at"] = now
                _write_json(path, record)
            if now >= dead_at + driver.release_lag + driver.free_lag:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            listed = now < dead_at + driver.release_lag
        held.append(
            Held(
                pid=record["pid"],
                device=record["device"],
                bytes=int(record["bytes"]),
                listed=listed,
                model=record.get("model"),
                engine=record.get("engine"),
                foreign=bool(record.get("foreign")),
            )
        )
    return driver, held


def used_on(held: Iterable[Held], device: str) -> int:
    return sum(h.bytes for h in held if h.device == device)


# --- the test's side: a DeviceProbe ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sighting:
    """A change the probe saw between two snapshots (time.time() of the snapshot)."""

    time: float
    kind: str  # "listed" or "unlisted"
    pid: int
    model: str | None


class FakeGpu:
    """`count` GPUs named "0", "1", ... of `total` bytes each (`reserved` of them the driver's),
    backed by `directory`; each engine's worker holds `context` bytes per GPU from its start.
    The defaults follow a real GPU: ~0.75% reserved, a 512 MiB context.

    Give the fake engines `env()`; read what vllmd saw in `readings` and `sightings`, or wait
    for a snapshot with `wait_for`."""

    def __init__(
        self,
        directory: Path,
        *,
        count: int = 1,
        total: int = 20 * GiB,
        reserved: int | None = None,
        context: int = 512 * MiB,
        release_lag: float = 0.0,
        free_lag: float = 0.0,
        pids: Literal["visible", "namespace", "wddm"] = "visible",
        product: str = "NVIDIA Fake GPU",
    ) -> None:
        self.directory = directory
        self._pids = pids
        self.product = product  # NVML's name of every device (the device type)
        directory.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4()
        if reserved is None:
            reserved = round(total * 0.0074 / MiB) * MiB  # an H100's 600 of 81559 MiB
        self._driver = Driver(
            devices=tuple(Device(str(i), f"GPU-{tag}-{i}", total, reserved) for i in range(count)),
            release_lag=release_lag,
            free_lag=free_lag,
            context=context,
        )
        _write_json(directory / DRIVER_FILE, self._driver.dump())
        self._down: dict[str, str] = {}  # device -> error
        self._foreign = 0
        self._lock = anyio.Lock()
        self._listed: set[int] = set()
        self._waiters: list[anyio.Event] = []
        self.snapshots = 0
        self.last: Mapping[str, DeviceSnapshot] = {}
        self.sightings: list[Sighting] = []
        self.readings: list[tuple[float, Mapping[str, DeviceSnapshot]]] = []  # every snapshot

    def env(self) -> dict[str, str]:
        """What a fake engine needs to find this GPU."""
        return {"FAKE_GPU_DIR": str(self.directory)}

    def uuid(self, device: str = "0") -> str:
        found = self._driver.find(device)
        assert found is not None
        return found.uuid

    def set_release(self, release_lag: float, free_lag: float = 0.0) -> None:
        """Change how long the driver keeps an exited process's memory."""
        self._driver = Driver(self._driver.devices, release_lag, free_lag, self._driver.context)
        _write_json(self.directory / DRIVER_FILE, self._driver.dump())

    def cuda_total(self, device: str = "0") -> int:
        found = self._driver.find(device)
        assert found is not None
        return found.cuda_total

    def add_foreign(self, nbytes: int, device: str = "0") -> int:
        """A process that is not vllmd's takes `nbytes` on `device`; returns its (fake) pid."""
        pid = FOREIGN_PID_BASE + self._foreign
        self._foreign += 1
        record = {"pid": pid, "device": device, "bytes": nbytes, "foreign": True}
        _write_json(self.directory / f"proc-{pid}.json", record)
        return pid

    def remove_foreign(self, pid: int) -> None:
        (self.directory / f"proc-{pid}.json").unlink()

    def set_up(self, device: str, up: bool, error: str = "NVML did not answer within 5 s") -> None:
        """Make a device stop (or start again) answering, as a wedged GPU would."""
        if up:
            self._down.pop(device, None)
        else:
            self._down[device] = error

    def held(self) -> list[Held]:
        """Every process's memory now (blocking: reads the directory)."""
        return read_driver(self.directory)[1]

    def workers(self, model: str) -> list[Held]:
        """The fake engine workers of `model` that hold memory now."""
        return [h for h in self.held() if h.model == model]

    async def snapshot(self) -> dict[str, DeviceSnapshot]:
        async with self._lock:
            driver, held = await anyio.to_thread.run_sync(read_driver, self.directory)
            now = time.time()
            snaps = {d.name: self._device(d, held) for d in driver.devices}
            listed = {h.pid: h for h in held if h.listed}
            models = {h.pid: h.model for h in held}
            for pid in sorted(set(listed) - self._listed):
                self.sightings.append(Sighting(now, "listed", pid, models.get(pid)))
            for pid in sorted(self._listed - set(listed)):
                self.sightings.append(Sighting(now, "unlisted", pid, models.get(pid)))
            self._listed = set(listed)
            self.snapshots += 1
            self.last = snaps
            self.readings.append((now, snaps))
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.set()
            return snaps

    async def wait_for(
        self, condition: Callable[[Mapping[str, DeviceSnapshot]], bool]
    ) -> Mapping[str, DeviceSnapshot]:
        """Wait until a snapshot (taken by whoever asks the probe) satisfies `condition`."""
        while not (self.snapshots and condition(self.last)):
            waiter = anyio.Event()
            self._waiters.append(waiter)
            await waiter.wait()
        return self.last

    def _device(self, device: Device, held: list[Held]) -> DeviceSnapshot:
        index = int(device.name) if device.name.isdigit() else None
        if device.name in self._down:  # like NvmlProbe's reading of a device that timed out
            return DeviceSnapshot(
                name=device.name,
                kind="gpu",
                uuid=device.uuid,
                index=index,
                total=0,
                used=None,
                free=None,
                utilization=None,
                temperature=None,
                power=None,
                processes=(),
                up=False,
                error=self._down[device.name],
            )
        mine = [h for h in held if h.device == device.name]
        total = device.cuda_total  # what NvmlProbe reads from NVML's v2 memory info
        used = min(total, used_on(mine, device.name))
        return DeviceSnapshot(
            name=device.name,
            kind="gpu",
            uuid=device.uuid,
            index=index,
            total=total,
            device_total=total,
            reserved=device.reserved,
            product=self.product,
            used=used,
            free=total - used,
            utilization=0.0,
            temperature=40.0,
            power=100.0,
            processes=tuple(self._listed_as(h) for h in mine if h.listed),
            up=True,
            error=None,
        )

    def _listed_as(self, held: Held) -> GpuProcess:
        if self._pids == "namespace":  # the host's pid, which this namespace does not know
            return GpuProcess(held.pid + HOST_PID_OFFSET, held.bytes)
        return GpuProcess(held.pid, None if self._pids == "wddm" else held.bytes)


# --- the engine's side ---------------------------------------------------------------------------


class StartupRefused(Exception):
    """vLLM's refusal to start: too little free memory on a device."""


class WorkerMemory:
    """The GPU memory of one fake engine: a worker process per visible GPU holding its share."""

    def __init__(
        self,
        directory: Path,
        devices: list[Device],
        full: int | None,
        utilization: float | None,
        model: str,
        environ: Mapping[str, str],
        context: int = 0,
    ) -> None:
        self._directory = directory
        self._devices = devices
        self._context = context
        self._full = {
            d.name: full if full is not None else context + _share(d, utilization) for d in devices
        }
        self._residue = {
            level: int(environ.get(f"FAKE_GPU_RESIDUE_L{level}", DEFAULT_RESIDUE))
            for level in (1, 2)
        }
        self._weights = int(environ.get("FAKE_GPU_WEIGHTS_BYTES", DEFAULT_WEIGHTS))
        self._model = model
        self._lock = threading.Lock()
        self._allocated = False
        self._asleep_level = 0
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._created: dict[str, float] = {}

    @classmethod
    def start(
        cls, utilization: float | None, model: str, environ: Mapping[str, str]
    ) -> WorkerMemory:
        """Spawn the workers, each holding its CUDA context at once; check free memory like
        vLLM's `request_memory` (raises StartupRefused, the workers gone); have them take
        their share after FAKE_GPU_ALLOC_DELAY seconds."""
        directory = Path(environ["FAKE_GPU_DIR"])
        driver, held = read_driver(directory)
        devices = []
        for visible in filter(None, environ.get("CUDA_VISIBLE_DEVICES", "").split(",")):
            device = driver.find(visible.strip())
            if device is None:
                raise StartupRefused(f"RuntimeError: CUDA error: no device {visible!r}")
            devices.append(device)
        if not devices:
            raise StartupRefused("RuntimeError: No CUDA GPUs are available")
        full = int(environ["FAKE_GPU_BYTES"]) if environ.get("FAKE_GPU_BYTES") else None
        memory = cls(directory, devices, full, utilization, model, environ, driver.context)
        for device in devices:
            # In the engine's process group, like vLLM's workers (not setsid).
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER, "VLLM::Worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            memory.workers[device.name] = worker
            memory._created[device.name] = psutil.Process(worker.pid).create_time()
        memory._write()  # the CUDA context (and NCCL's buffers), before anything is measured
        if environ.get("FAKE_GPU_CHECK_FREE", "1") != "0":
            _, held = read_driver(directory)
            for i, device in enumerate(devices):
                # torch.cuda.mem_get_info: CUDA's free and total, this context already in use.
                free = device.cuda_total - used_on(held, device.name)
                wanted = _share(device, utilization)
                if free < wanted:
                    memory.stop()
                    raise StartupRefused(
                        f"ValueError: Free memory on device cuda:{i} ({_gib(free)}/"
                        f"{_gib(device.cuda_total)} GiB) on startup is less than desired GPU "
                        f"memory utilization ({utilization or 0.9}, {_gib(wanted)} GiB). "
                        "Decrease GPU memory utilization or reduce GPU memory used by other "
                        "processes."
                    )
        timer = threading.Timer(float(environ.get("FAKE_GPU_ALLOC_DELAY", "0.1")), memory.allocate)
        timer.daemon = True
        timer.start()
        return memory

    def stop(self) -> None:
        """The workers exit (a refused start): their memory is the driver's business now."""
        for worker in self.workers.values():
            worker.kill()
            worker.wait()

    def allocate(self) -> None:
        with self._lock:
            self._allocated = True
            self._write()

    def sleep(self, level: int) -> None:
        with self._lock:
            if level == 1:  # the weights to host RAM, each worker its shard
                self._tell_workers(f"hold {self._weights // len(self.workers)}")
            self._asleep_level = level
            self._write()

    def wake(self) -> None:
        with self._lock:
            if self._asleep_level == 1:
                self._tell_workers("free")
            self._asleep_level = 0
            self._write()

    def _tell_workers(self, command: str) -> None:
        for worker in self.workers.values():
            if worker.poll() is None and worker.stdin and worker.stdout:
                worker.stdin.write(f"{command}\n".encode())
                worker.stdin.flush()
                worker.stdout.readline()  # done: the bytes are resident

    def _write(self) -> None:
        for device in self._devices:
            worker = self.workers[device.name]
            if worker.poll() is not None:
                continue  # a dead worker's memory is the driver's business now
            nbytes = self._full[device.name] if self._allocated else self._context
            if not nbytes:
                continue
            if self._asleep_level:
                nbytes = min(nbytes, self._residue[self._asleep_level])
            record = {
                "pid": worker.pid,
                "created": self._created[device.name],
                "device": device.name,
                "bytes": nbytes,
                "model": self._model,
                "engine": os.getpid(),
            }
            _write_json(self._directory / f"proc-{worker.pid}.json", record)


def _share(device: Device, utilization: float | None) -> int:
    """vLLM's `request_memory`: ceil(F x CUDA's total memory), F = --gpu-memory-utilization."""
    if utilization is None:
        utilization = 0.9  # vLLM's default
    return math.ceil(utilization * device.cuda_total)


def _gib(nbytes: int) -> str:
    """vLLM's format_gib: GiB rounded to two places."""
    return f"{round(nbytes / GiB, 2)}"
