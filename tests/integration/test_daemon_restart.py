"""What survives `kill -9` of the daemon (real `vllmd serve` processes, the fake engine): the
orphaned engine is killed by the next daemon before it starts anything, the model loaded on
purpose comes back, runtime pins hold, event ids go on; and a state database written by a
process killed mid-write opens intact."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from tests.integration.harness import FAKE_ENGINE
from tests.integration.test_cli import _free_port
from vllmd.engine.process import group_alive
from vllmd.store import StateStore

VLLMD = [sys.executable, "-m", "vllmd.cli.entry"]
VLLMCTL = [sys.executable, "-m", "vllmd.cli.vllmctl"]


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "vllmd.toml"
    models = "".join(
        f"""
[models.{name}]
model = "fake/{name}"
devices = ["cpu0"]
memory = "3GiB"
"""
        for name in ("m", "n")
    )
    path.write_text(
        f"""
[daemon]
state_dir = "state"
control_socket = "ctl.sock"
[gateway]
listen = "127.0.0.1:{port}"
[engine]
command = ["{sys.executable}", "{FAKE_ENGINE}"]
model_flag = "--model"
stop_timeout = "3s"
drain_timeout = "1s"
[devices.cpu0]
kind = "cpu"
memory = "16GiB"
{models}
"""
    )
    return path


class Daemon:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.log = config, log
        self.socket = config.parent / "ctl.sock"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [*VLLMD, "serve", "--config", str(config), "--log-format", "json"],
                stdout=out,
                stderr=out,
            )
        health = f"http://127.0.0.1:{port}/health"  # up once both sockets are bound
        self._wait(lambda: httpx.get(health, timeout=5).status_code == 200, "never answered")

    def get(self, path: str) -> httpx.Response:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://vllmd", timeout=30) as http:
            return http.get(path)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*VLLMCTL, "--socket", str(self.socket), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def model(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.get(f"/v1/models/{name}").json()
        return body

    def _wait(self, ok: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if ok():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.process.kill()
        pytest.fail(f"vllmd {what}: {self.log.read_text()[-3000:]}")

    def entries(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found


def test_after_kill_9_the_orphan_goes_first_and_the_model_loaded_on_purpose_returns(
    tmp_path: Path,
) -> None:
    port = _free_port()
    config, log = _config(tmp_path, port), tmp_path / "daemon.log"
    first = Daemon(config, port, log)
    assert first.ctl("load", "m").returncode == 0
    assert first.ctl("pin", "n").returncode == 0
    orphan = int(first.model("m")["pid"])
    first_ids = [e["id"] for e in json.loads(first.ctl("--json", "events").stdout)["events"]]
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    time.sleep(0.5)
    assert group_alive(orphan), "the engine should have outlived the daemon (orphaned)"

    second = Daemon(config, port, log)
    engine = 0
    try:
        second._wait(lambda: second.model("m")["state"] == "ready", "never reloaded m")
        assert not group_alive(orphan)
        engine = int(second.model("m")["pid"])
        assert engine != orphan
        assert second.model("n")["pinned"] is True and second.model("n")["state"] == "stopped"
        told = ("orphans_killed", "spawned")
        order = [e["event"] for e in second.entries() if e.get("event") in told]
        assert order == ["spawned", "orphans_killed", "spawned"]  # first run, then the second
        killed = next(e for e in second.entries() if e.get("event") == "orphans_killed")
        assert orphan in killed["pids"]
        events = json.loads(second.ctl("--json", "events", "--limit", "1000").stdout)["events"]
        ids = [e["id"] for e in events]
        assert ids == sorted(ids) and set(first_ids) <= set(ids)  # one log across both runs
        assert min(i for i in ids if i not in first_ids) > max(first_ids)
    finally:
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(30) == 0
    assert engine and not group_alive(engine)


WRITER = """
import sys
from pathlib import Path

import anyio
import structlog

from vllmd.events import EventBus, Kind
from vllmd.overrides import Overrides
from vllmd.store import StateStore

structlog.configure(logger_factory=structlog.ReturnLoggerFactory())


async def main() -> None:
    store = StateStore(Path(sys.argv[1]), retention=lambda: 86400.0)
    await store.open()
    bus = EventBus(next_id=store.next_id)
    async with anyio.create_task_group() as tg:
        await tg.start(store.run, bus, Overrides())
        n = 0
        while True:
            for _ in range(200):
                bus.emit(Kind.STATE, "m", old="stopped", new="starting", n=n, pad="x" * 100)
                n += 1
            await anyio.sleep(0.001)


anyio.run(main)
"""


def test_a_store_killed_mid_write_leaves_a_readable_database(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    db = tmp_path / "vllmd.db"
    deadline = time.monotonic() + 30
    count = 0
    while count < 20_000 and time.monotonic() < deadline and writer.poll() is None:
        time.sleep(0.1)
        try:
            with sqlite3.connect(db, timeout=5) as conn:
                count = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        except sqlite3.OperationalError:
            continue  # not made yet
    assert count >= 20_000, "the writer never got going"
    assert psutil.Process(writer.pid).status() != psutil.STATUS_ZOMBIE
    writer.send_signal(signal.SIGKILL)  # in the middle of its stream of transactions
    writer.wait(10)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT id, fields FROM events ORDER BY id").fetchall()
    assert len(rows) >= count
    assert all(json.loads(f)["pad"] == "x" * 100 for _, f in rows)  # no torn row
    store = StateStore(tmp_path, retention=lambda: 86400.0)
    anyio.run(store.open)
    assert not store.degraded()
    assert store.next_id() > rows[-1][0]  # ids go on past every one handed out
    anyio.run(store.drain)
