"""`vllmctl` as operators run it: a real process against a real daemon (fake engines)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import Process

from tests.integration.harness import FAKE_ENGINE, client, fake_config, running
from vllmd.config import load_config
from vllmd.daemon import Running

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
VLLMCTL = [sys.executable, "-m", "vllmd.cli.vllmctl"]
COMPLETION = ROOT / "contrib" / "bash-completion" / "vllmctl"
# The environment of every vllmctl run: no $VLLMD_SOCKET from the outside.
ENV = {k: v for k, v in os.environ.items() if k != "VLLMD_SOCKET"}


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def _result(rc: int | None, out: bytes, err: bytes) -> Result:
    assert rc is not None
    return Result(rc, out.decode(), err.decode())


async def vllmctl(
    socket_path: Path | None, *args: str, env: Mapping[str, str] | None = None
) -> Result:
    """vllmctl in its own process; awaited, so the daemon in this event loop keeps serving."""
    where = ["--socket", str(socket_path)] if socket_path is not None else []
    done = await anyio.run_process(
        [*VLLMCTL, *where, *args], check=False, env={**ENV, **(env or {})}
    )
    return _result(done.returncode, done.stdout, done.stderr)


def vllmctl_sync(*args: str) -> Result:
    done = subprocess.run([*VLLMCTL, *args], capture_output=True, env=ENV, timeout=60, check=False)
    return _result(done.returncode, done.stdout, done.stderr)


def row(result: Result, name: str) -> list[str]:
    """The cells of `name`'s row in `vllmctl ps`."""
    rows = [line.split() for line in result.lines[1:]]
    return next(r for r in rows if r[0] == name)


async def api(run: Running, path: str) -> Any:
    transport = httpx.AsyncHTTPTransport(uds=str(run.control_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://vllmd") as http:
        return (await http.get(path)).json()


# --- reading and verbs ---------------------------------------------------------------------------


async def test_ps_lists_every_model_and_its_state(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}, "b": {"pinned": True}})) as run:
        result = await vllmctl(run.control_socket, "ps")
        assert result.rc == 0, result.err
        assert result.lines[0].split()[:2] == ["NAME", "STATE"]
        assert row(result, "a")[:2] == ["a", "stopped"]
        assert row(result, "b")[:2] == ["b", "stopped"]
        # $VLLMD_SOCKET stands in for --socket; --names prints just the names.
        names = await vllmctl(None, "ps", "--names", env={"VLLMD_SOCKET": str(run.control_socket)})
        assert (names.rc, names.lines) == (0, ["a", "b"])


async def test_load_makes_the_model_ready_with_a_pid_and_unload_stops_it(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        loaded = await vllmctl(run.control_socket, "load", "a")
        assert loaded.rc == 0, loaded.err
        match = re.fullmatch(r"a: ready \(pid (\d+)\)", loaded.out.strip())
        assert match, loaded.out
        ps = await vllmctl(run.control_socket, "ps")
        cells = row(ps, "a")
        assert cells[:4] == ["a", "ready", "cpu0", "3.0GiB"]
        assert cells[4].endswith("iB")  # measured after the start
        assert cells[5] == match[1]
        unloaded = await vllmctl(run.control_socket, "unload", "a")
        assert (unloaded.rc, unloaded.out.strip()) == (0, "a: stopped")
        assert row(await vllmctl(run.control_socket, "ps"), "a")[1] == "stopped"


async def test_unload_of_a_pinned_model_is_refused_and_says_unpin(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        pinned = await vllmctl(run.control_socket, "pin", "a")
        assert (pinned.rc, pinned.out.strip()) == (0, "a: stopped, pinned")
        refused = await vllmctl(run.control_socket, "unload", "a")
        assert refused.rc == 1
        assert refused.err.startswith("vllmctl: ")
        assert "unpin" in refused.err
        assert "Traceback" not in refused.err


async def test_a_verb_on_an_unknown_model_exits_1(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        result = await vllmctl(run.control_socket, "load", "nope")
        assert result.rc == 1
        assert result.err.strip() == "vllmctl: The model `nope` does not exist."
        # With --json the API's error body comes out on stdout as well.
        body = await vllmctl(run.control_socket, "--json", "unload", "nope")
        assert json.loads(body.out)["error"]["code"] == "model_not_found"


async def test_load_that_outlasts_its_timeout_exits_1_and_says_so(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {"env": {"FAKE_STARTUP_DELAY": "1"}}})) as run:
        result = await vllmctl(run.control_socket, "load", "a", "--timeout", "0")
        assert result.rc == 1
        assert "not done within 0s" in result.err


async def test_load_no_wait_returns_at_once_as_accepted(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {"env": {"FAKE_STARTUP_DELAY": "1"}}})) as run:
        result = await vllmctl(run.control_socket, "load", "a", "--no-wait")
        assert result.rc == 0, result.err
        assert "load accepted" in result.out
        assert result.out.startswith("a: ")
        assert not result.out.startswith("a: ready")


def test_usage_error_exits_2() -> None:
    result = vllmctl_sync("load")
    assert result.rc == 2
    assert "usage: vllmctl" in result.err


def test_missing_socket_exits_3_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    result = vllmctl_sync("--socket", str(missing), "ps")
    assert result.rc == 3
    assert str(missing) in result.err
    assert "systemctl status vllmd" in result.err
    assert "Traceback" not in result.err


def test_socket_nobody_listens_on_exits_3(tmp_path: Path) -> None:
    """A socket file left behind by a daemon that died: connection refused."""
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening
        result = vllmctl_sync("--socket", str(path), "status")
    assert result.rc == 3
    assert "connection refused" in result.err


async def test_json_ps_is_the_api_body(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}, "b": {}})) as run:
        result = await vllmctl(run.control_socket, "--json", "ps")
        assert result.rc == 0
        assert json.loads(result.out) == await api(run, "/v1/models")


async def test_status_and_devices_show_the_declared_device(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}, "b": {}})) as run:
        status = await vllmctl(run.control_socket, "status")
        assert status.rc == 0, status.err
        assert status.lines[0].startswith(f"vllmd 0.1.0, pid {os.getpid()}, up ")
        assert "device cpu0 (cpu): total 64.0GiB" in status.out
        assert "models: 2 stopped" in status.lines
        devices = await vllmctl(run.control_socket, "devices")
        assert devices.lines[1].split()[:3] == ["cpu0", "cpu", "64.0GiB"]


async def test_events_prints_one_line_per_event(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        assert (await vllmctl(run.control_socket, "load", "a")).rc == 0
        events = await vllmctl(run.control_socket, "events", "--limit", "50")
        assert events.rc == 0, events.err
        assert events.lines
        for line in events.lines:
            assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d #\d+ \w+ ", line), line
        assert any(re.search(r" spawned a pid=\d+ ", line) for line in events.lines)
        assert any(" state a old=starting new=ready" in line for line in events.lines)
        last_id = max(e["id"] for e in (await api(run, "/v1/events"))["events"])
        after = await vllmctl(run.control_socket, "events", "--since", str(last_id))
        assert (after.rc, after.out) == (0, "")


async def test_events_follow_prints_new_events_and_exits_1_when_the_daemon_stops(
    tmp_path: Path,
) -> None:
    proc: Process | None = None
    try:
        async with running(fake_config(tmp_path, {"a": {}})) as run:
            command = [*VLLMCTL, "--socket", str(run.control_socket), "events", "-f"]
            proc = await anyio.open_process(command, env=ENV)
            assert proc.stdout is not None
            assert (await vllmctl(run.control_socket, "load", "a")).rc == 0
            seen = b""
            with anyio.fail_after(10):
                while b"state a old=starting new=ready" not in seen:
                    seen += await proc.stdout.receive()
        with anyio.fail_after(10):
            rc = await proc.wait()
        assert proc.stderr is not None
        err = b"".join([chunk async for chunk in proc.stderr]).decode()
        assert rc == 1
        assert "is it stopping?" in err
        assert "Traceback" not in err
    finally:
        if proc is not None:
            await proc.aclose()


# --- logs --------------------------------------------------------------------------------------


async def test_logs_n_prints_the_engines_last_lines(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        assert (await vllmctl(run.control_socket, "load", "a")).rc == 0
        result = await vllmctl(run.control_socket, "logs", "a", "-n", "2")
        assert result.rc == 0, result.err
        assert result.lines == (await api(run, "/v1/models/a/logs?tail=2"))["lines"]
        assert len(result.lines) == 2


async def test_logs_follow_prints_new_lines_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"a": {}})) as run:
        assert (await vllmctl(run.control_socket, "load", "a")).rc == 0
        command = [*VLLMCTL, "--socket", str(run.control_socket), "logs", "a", "-n", "1", "-f"]
        async with await anyio.open_process(command, env=ENV) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            seen = b""
            with anyio.fail_after(10):
                seen += await proc.stdout.receive()  # the tail
                async with client(run) as http:
                    body = {"model": "a", "prompt": "x", "max_tokens": 1}
                    assert (await http.post("/v1/completions", json=body)).status_code == 200
                while b"Received request" not in seen.split(b"\n", 1)[-1]:
                    seen += await proc.stdout.receive()
                proc.send_signal(signal.SIGINT)
                rc = await proc.wait()
            err = b"".join([chunk async for chunk in proc.stderr])
        assert rc == 0
        assert b"Traceback" not in err
        assert err == b""


# --- doctor --------------------------------------------------------------------------------------


def _config_file(
    tmp_path: Path,
    *,
    command: Sequence[str] = (sys.executable, str(FAKE_ENGINE)),
    state_dir: Path | None = None,
    memory: str = "3GiB",
    listen: str = "127.0.0.1:0",
) -> Path:
    path = tmp_path / "vllmd.toml"
    path.write_text(
        f"""
[daemon]
state_dir = {json.dumps(str(state_dir or tmp_path / "state"))}
control_socket = {json.dumps(str(tmp_path / "ctl.sock"))}
[gateway]
listen = "{listen}"
[engine]
command = {json.dumps(list(command))}
model_flag = "--model"
startup_timeout = "10s"
stop_timeout = "3s"
drain_timeout = "1s"
[devices.cpu0]
kind = "cpu"
memory = "64GiB"
[models.a]
model = "fake/a"
devices = ["cpu0"]
memory = "{memory}"
"""
    )
    return path


def doctor(tmp_path: Path, config: Path) -> Result:
    """doctor with the daemon down: its socket does not exist."""
    return vllmctl_sync("--socket", str(tmp_path / "none.sock"), "doctor", "--config", str(config))


def line(result: Result, status: str, check: str) -> str:
    """The one line of `check`, asserted to have `status`."""
    found = [text for text in result.lines if re.match(rf"[A-Z]+  {re.escape(check)}: ", text)]
    assert len(found) == 1, result.out
    assert found[0].startswith(f"{status}  "), found[0]
    return found[0]


def test_doctor_with_the_daemon_down_passes_a_healthy_setup(tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    result = doctor(tmp_path, config)
    assert result.rc == 0, result.out
    assert "cannot reach vllmd at" in line(result, "WARN", "daemon")
    assert line(result, "PASS", "config valid").endswith(str(config))
    line(result, "PASS", "control socket directory")
    line(result, "PASS", "state dir")
    assert line(result, "PASS", "engine command").endswith(sys.executable)
    line(result, "PASS", "model a fits")
    assert line(result, "PASS", "gateway port").endswith("is free")
    assert not [text for text in result.lines if text.startswith("FAIL")]


def test_doctor_warns_of_a_model_it_cannot_size_yet(tmp_path: Path) -> None:
    """memory = "auto" for a hub id not downloaded: a WARN with the fix, not a FAIL."""
    config = _config_file(tmp_path, memory="auto")
    text = config.read_text().replace(
        'memory = "auto"', 'memory = "auto"\nenv = { HF_HUB_CACHE = "/nonexistent" }'
    )
    config.write_text(text)
    result = doctor(tmp_path, config)
    assert result.rc == 0, result.out
    found = line(result, "WARN", "model a fits")
    assert "fake/a is not in the engine's HF cache yet" in found
    assert "download fake/a where the engine looks, or set models.a.memory" in result.out


async def test_doctor_with_the_daemon_up_reads_its_config_path(tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    async with running(load_config(config)) as run:
        result = await vllmctl(run.control_socket, "doctor")
        assert result.rc == 0, result.out
        assert line(result, "PASS", "daemon").startswith(
            f"PASS  daemon: vllmd 0.1.0, pid {os.getpid()}"
        )
        assert line(result, "PASS", "config valid").endswith(str(config))
        line(result, "PASS", "control socket")
        # Port 0 (any free port) is always free (a port the daemon holds: test_vllmctl_first_run).
        assert line(result, "PASS", "gateway port").endswith("127.0.0.1:0 is free")


def test_doctor_fails_a_missing_engine_command(tmp_path: Path) -> None:
    result = doctor(tmp_path, _config_file(tmp_path, command=["/nonexistent/bin/vllm", "serve"]))
    assert result.rc == 1
    assert "/nonexistent/bin/vllm not found" in line(result, "FAIL", "engine command")
    assert "fix: " in result.out


def test_doctor_fails_an_engine_module_its_python_cannot_import(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "no_such_engine_module.server"]
    result = doctor(tmp_path, _config_file(tmp_path, command=command))
    assert result.rc == 1
    assert "no_such_engine_module not importable" in line(result, "FAIL", "engine module")


def test_doctor_fails_a_state_dir_that_cannot_be_created(tmp_path: Path) -> None:
    """Tests run as root, who may write anywhere: a regular file in the way stops even root."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = doctor(tmp_path, _config_file(tmp_path, state_dir=blocker / "state"))
    assert result.rc == 1
    assert f"{blocker} is not a directory" in line(result, "FAIL", "state dir")


def test_doctor_fails_a_model_that_cannot_fit(tmp_path: Path) -> None:
    result = doctor(tmp_path, _config_file(tmp_path, memory="100GiB"))
    assert result.rc == 1
    line(result, "FAIL", "config valid")
    assert re.search(r"models\.a\.memory: 100\.0GiB can never fit on device \"cpu0\"", result.out)


def test_doctor_fails_a_gateway_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = doctor(tmp_path, _config_file(tmp_path, listen=f"127.0.0.1:{port}"))
    assert result.rc == 1
    assert f"127.0.0.1:{port}" in line(result, "FAIL", "gateway port")


# --- bash completion -------------------------------------------------------------------------


async def complete(words: Sequence[str], **env: str) -> list[str]:
    """What the completion offers for the last of `words` (the word being typed)."""
    script = (
        f'source "{COMPLETION}"; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _vllmctl; '
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    command = ["bash", "-c", script, "bash", *words]
    done = await anyio.run_process(command, env={**ENV, **env}, check=False)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.decode().splitlines() if w]


async def test_completion_offers_verbs_and_their_options() -> None:
    assert await complete(["vllmctl", "l"]) == ["load", "logs"]
    assert await complete(["vllmctl", "--socket", "/x.sock", "un"]) == ["unload", "unpin"]
    assert "--follow" in await complete(["vllmctl", "logs", "-"])
    assert "--no-wait" in await complete(["vllmctl", "load", "--"])


async def test_completion_offers_model_names_from_the_socket_on_the_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "vllmctl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m vllmd.cli.vllmctl "$@"\n')
    wrapper.chmod(0o755)
    path = f"{bin_dir}:{ENV['PATH']}"
    nowhere = str(tmp_path / "none.sock")
    models: dict[str, dict[str, Any]] = {"alpha": {}, "apple": {}, "beta": {}}
    async with running(fake_config(tmp_path, models)) as run:
        sock = str(run.control_socket)
        # --socket on the line wins over $VLLMD_SOCKET, as it does for vllmctl itself.
        words = ["vllmctl", "--socket", sock, "load", "a"]
        assert await complete(words, PATH=path, VLLMD_SOCKET=nowhere) == ["alpha", "apple"]
        words = ["vllmctl", "--socket", sock, "logs", ""]
        assert await complete(words, PATH=path) == ["alpha", "apple", "beta"]
        # A name is given already: nothing more to offer.
        assert await complete(["vllmctl", "--socket", sock, "load", "beta", ""], PATH=path) == []
        # No daemon on the socket vllmctl would use: no names, and no error on the terminal.
        assert await complete(["vllmctl", "load", ""], PATH=path, VLLMD_SOCKET=nowhere) == []


async def test_alerts_lists_a_firing_alert_and_status_counts_it(tmp_path: Path) -> None:
    rule = {
        "name": "QueueWatch",
        "signal": "model_queue_depth",
        "op": ">=",
        "threshold": 0,
        "for": "0s",
        "severity": "info",
        "annotations": {"summary": "watching {{ $labels.model }}"},
    }
    config = fake_config(
        tmp_path, {"a": {}}, alerts={"interval": "100ms", "alertmanager": [], "rules": [rule]}
    )
    async with running(config) as run:
        with anyio.fail_after(10):
            while "QueueWatch" not in (listed := await vllmctl(run.control_socket, "alerts")).out:  # noqa: ASYNC110
                await anyio.sleep(0.1)  # the command's output is what is watched
        status = await vllmctl(run.control_socket, "status")
    row = next(line for line in listed.lines if line.startswith("QueueWatch"))
    assert row.split()[:4] == ["QueueWatch", "firing", "info", "a"]
    assert row.endswith("watching a")
    assert any(
        line.startswith("alerts firing: ") and line != "alerts firing: 0" for line in status.lines
    )
