"""The control API on its Unix socket, against a running daemon with fake engines: every
endpoint, the verbs' edge cases of docs/design.md "Control API", its error codes, the socket itself
(mode, stale and live files) and its limits."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.integration.harness import client, control, eventually, fake_config, running
from vllmd.config import Config
from vllmd.control.listener import bind_unix
from vllmd.errors import ListenFailed
from vllmd.instance.states import InstanceState

pytestmark = pytest.mark.anyio
S = InstanceState


def _error(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    return response.status_code, str(body["error"]["code"])


def _config(tmp_path: Path, **daemon: Any) -> Config:
    return fake_config(
        tmp_path,
        {"a": {"aliases": ["org/a-alias"]}, "b": {"pinned": True}, "c": {}},
        daemon={"control_socket": str(tmp_path / "ctl.sock"), **daemon},
    )


async def test_status_models_and_devices_have_designs_shapes(tmp_path: Path) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        status = (await ctl.get("/v1/status")).json()
        models = (await ctl.get("/v1/models")).json()["models"]
        one = (await ctl.get("/v1/models/a")).json()
        by_alias = (await ctl.get("/v1/models/org%2Fa-alias")).json()
        devices = (await ctl.get("/v1/devices")).json()["devices"]
    assert status["version"] and status["pid"] == os.getpid()
    assert status["uptime_seconds"] >= 0
    assert status["models_by_state"] == {"stopped": 3}
    assert status["alerts_firing"] == 0
    (cpu,) = status["devices"]
    assert set(cpu) == {
        "name",
        "kind",
        "total_bytes",
        "reserved_bytes",
        "used_bytes",
        "free_bytes",
        "up",
        "pids_unseen",
    }
    assert cpu["name"] == "cpu0" and cpu["up"] and cpu["reserved_bytes"] == 0
    assert cpu["pids_unseen"] is None
    assert [m["name"] for m in models] == ["a", "b", "c"]
    assert one["name"] == "a" and one["state"] == "stopped" and one["aliases"] == ["org/a-alias"]
    assert by_alias == one
    for key in ("devices", "reserved_bytes", "last_used", "in_flight", "queue_depth"):
        assert key in one
    assert devices[0]["models"] == []


async def test_load_waits_until_ready_and_counts_the_reservation(tmp_path: Path) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        loaded = await ctl.post("/v1/models/a/load")
        devices = (await ctl.get("/v1/devices")).json()["devices"]
        status = (await ctl.get("/v1/status")).json()
    assert loaded.status_code == 200, loaded.text
    view = loaded.json()
    assert view["state"] == "ready" and isinstance(view["pid"], int)
    assert devices[0]["models"] == [{"name": "a", "reserved_bytes": 3 * 2**30}]
    assert devices[0]["reserved_bytes"] == 3 * 2**30
    assert status["models_by_state"] == {"ready": 1, "stopped": 2}


async def test_wait_false_answers_202_at_once_and_the_load_goes_on(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"a": {"env": {"FAKE_STARTUP_DELAY": "1.5"}}}, daemon={})
    async with running(config) as run, control(run) as ctl:
        with anyio.fail_after(1.0):
            accepted = await ctl.post("/v1/models/a/load", params={"wait": "false"})
        instance = run.supervisor.get("a")
        with anyio.fail_after(10):
            await instance.wait_state(S.READY)
    assert accepted.status_code == 202
    assert accepted.json()["state"] in ("stopped", "starting")


async def test_a_wait_past_its_timeout_is_504_with_the_state_so_far(tmp_path: Path) -> None:
    config = fake_config(tmp_path, {"a": {"env": {"FAKE_STARTUP_DELAY": "2"}}})
    async with running(config) as run, control(run) as ctl:
        late = await ctl.post("/v1/models/a/load", params={"timeout": "0.3"})
        instance = run.supervisor.get("a")
        with anyio.fail_after(10):
            await instance.wait_state(S.READY)  # it went on
    assert _error(late) == (504, "timeout")
    assert late.json()["error"]["model"]["state"] == "starting"


async def test_verbs_edge_cases(tmp_path: Path) -> None:
    """docs/design.md: sleep of a model that cannot sleep is invalid_state ("use unload"); unload
    of a pinned model is invalid_state ("unpin first"); unpin of a config pin is invalid_state; pin
    of a stopped model pins it without loading; wake and restart of a stopped model load it;
    restart of a running one starts a new engine, counted as a manual restart."""
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        sleep_cpu = await ctl.post("/v1/models/a/sleep")
        unload_pinned = await ctl.post("/v1/models/b/unload")
        unpin_config = await ctl.post("/v1/models/b/unpin")
        pinned = await ctl.post("/v1/models/c/pin")
        unload_runtime_pin = await ctl.post("/v1/models/c/unload")
        unpinned = await ctl.post("/v1/models/c/unpin")
        woken = await ctl.post("/v1/models/a/wake")
        first_pid = woken.json()["pid"]
        restarted = await ctl.post("/v1/models/a/restart")
        restarted_stopped = await ctl.post("/v1/models/c/restart")
        restarts = run.metrics.registry.get_sample_value(
            "vllmd_model_restarts_total", {"model": "a", "reason": "manual"}
        )
        unloaded = await ctl.post("/v1/models/a/unload")
        unload_again = await ctl.post("/v1/models/a/unload")
    assert _error(sleep_cpu) == (409, "invalid_state")
    assert "use unload" in sleep_cpu.json()["error"]["message"]
    assert _error(unload_pinned) == (409, "invalid_state")
    assert "unpin first" in unload_pinned.json()["error"]["message"]
    assert _error(unpin_config) == (409, "invalid_state")
    assert "pinned in the config" in unpin_config.json()["error"]["message"]
    assert pinned.status_code == 200
    assert pinned.json()["pinned"] is True and pinned.json()["state"] == "stopped"
    assert _error(unload_runtime_pin) == (409, "invalid_state")
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False
    assert woken.status_code == 200 and woken.json()["state"] == "ready"
    assert restarted.status_code == 200 and restarted.json()["state"] == "ready"
    assert restarted.json()["pid"] != first_pid
    assert restarts == 1
    assert restarted_stopped.status_code == 200 and restarted_stopped.json()["state"] == "ready"
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "stopped"
    assert unload_again.status_code == 200  # already stopped: nothing to do


async def test_loaded_on_purpose_is_marked_and_unload_clears_it(tmp_path: Path) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        await ctl.post("/v1/models/a/load")
        overrides = run.supervisor.overrides
        marked = overrides.loaded_on_purpose("a")
        await ctl.post("/v1/models/a/unload")
        cleared = not overrides.loaded_on_purpose("a")
    assert marked and cleared


async def test_every_error_code_is_a_clean_answer_and_the_daemon_stays_up(
    tmp_path: Path,
) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        answers = {
            "no such route": await ctl.get("/v1/nope"),
            "no prefix": await ctl.get("/status"),
            "no such model": await ctl.post("/v1/models/zz/load"),
            "no such model (read)": await ctl.get("/v1/models/zz"),
            "wrong method": await ctl.get("/v1/models/a/load"),
            "wrong method (read)": await ctl.post("/v1/status"),
            "bad tail": await ctl.get("/v1/models/a/logs", params={"tail": "x"}),
            "bad since": await ctl.get("/v1/events", params={"since": "yesterday"}),
            "bad timeout": await ctl.post("/v1/models/a/load", params={"timeout": "-1"}),
            "too large": await ctl.post("/v1/models/a/load", content=b"x" * (65 * 1024)),
            "reload, no file": await ctl.post("/v1/reload"),
            "reload by GET": await ctl.get("/v1/reload"),
        }
        still = await ctl.get("/v1/status")
    assert {k: _error(r) for k, r in answers.items()} == {
        "no such route": (404, "not_found"),
        "no prefix": (404, "not_found"),
        "no such model": (404, "model_not_found"),
        "no such model (read)": (404, "model_not_found"),
        "wrong method": (405, "method_not_allowed"),
        "wrong method (read)": (405, "method_not_allowed"),
        "bad tail": (400, "bad_request"),
        "bad since": (400, "bad_request"),
        "bad timeout": (400, "bad_request"),
        "too large": (413, "body_too_large"),
        "reload, no file": (422, "config_invalid"),
        "reload by GET": (405, "method_not_allowed"),
    }
    assert still.status_code == 200


async def test_start_failed_and_insufficient_memory_and_shutting_down(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        {
            "broken": {"env": {"FAKE_MODE": "crash_at_start"}, "max_restarts": 1},
            "big": {"memory": "60GiB"},
            "other": {"memory": "60GiB", "pinned": True, "preload": True},
        },
    )
    async with running(config) as run, control(run) as ctl:
        await eventually(lambda: run.supervisor.get("other").state is S.READY, timeout=10)
        broken = await ctl.post("/v1/models/broken/load")
        big = await ctl.post("/v1/models/big/load")
    assert _error(broken) == (502, "start_failed")
    assert "vllmctl logs broken" in broken.json()["error"]["message"]
    assert _error(big) == (409, "insufficient_memory")


def _exchange(path: Path, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes on the socket (in a thread: the daemon shares this event loop)."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(wait)
        raw.connect(str(path))
        raw.sendall(data)
        return raw.recv(65536)


async def test_malformed_http_is_a_clean_400_and_the_next_connection_works(
    tmp_path: Path,
) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        answer = await anyio.to_thread.run_sync(
            _exchange, run.control_socket, b"NOT HTTP AT ALL\r\n\r\n"
        )
        still = await ctl.get("/v1/status")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"bad_request"' in answer
    assert still.status_code == 200


async def test_logs_tail_and_follow(tmp_path: Path) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl, client(run) as http:
        await ctl.post("/v1/models/a/load")
        tail = (await ctl.get("/v1/models/a/logs", params={"tail": "2"})).json()
        followed: list[str] = []
        params = {"tail": "1", "follow": "1"}
        async with ctl.stream("GET", "/v1/models/a/logs", params=params) as stream:
            assert stream.headers["content-type"] == "application/x-ndjson"
            lines = stream.aiter_lines()
            followed.append(json.loads(await anext(lines))["line"])  # the tail
            body = {"model": "a", "prompt": "x", "max_tokens": 1}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            with anyio.fail_after(5):
                async for line in lines:
                    followed.append(json.loads(line)["line"])
                    if "Received request" in followed[-1]:
                        break
    assert tail["model"] == "a" and len(tail["lines"]) == 2
    assert followed[0] == tail["lines"][-1]
    assert any("Received request" in line for line in followed[1:])


async def test_events_since_id_and_time_limit_and_follow(tmp_path: Path) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        await ctl.post("/v1/models/a/load")
        everything = (await ctl.get("/v1/events", params={"limit": "1000"})).json()["events"]
        pivot = everything[len(everything) // 2]
        after = (await ctl.get("/v1/events", params={"since": pivot["id"]})).json()["events"]
        stamp = everything[-1]["time"]
        moment = datetime.fromtimestamp(stamp - 0.001, tz=UTC)  # isoformat keeps microseconds
        by_time = (await ctl.get("/v1/events", params={"since": moment.isoformat()})).json()
        limited = (await ctl.get("/v1/events", params={"limit": "2"})).json()["events"]
        followed: list[dict[str, Any]] = []
        last = everything[-1]["id"]
        async with ctl.stream("GET", "/v1/events", params={"since": last, "follow": "1"}) as s:
            lines = s.aiter_lines()
            unload = anyio.Event()

            async def unload_a() -> None:
                await unload.wait()
                await ctl.post("/v1/models/a/unload")

            async with anyio.create_task_group() as tg:
                tg.start_soon(unload_a)
                unload.set()
                with anyio.fail_after(10):
                    async for line in lines:
                        followed.append(json.loads(line))
                        if followed[-1].get("new") == "stopped":
                            break
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = {e["kind"] for e in everything}
    assert {"state", "spawned", "control"} <= kinds
    assert [e["id"] for e in after] == [i for i in ids if i > pivot["id"]]
    assert by_time["events"] and all(e["time"] >= stamp - 0.001 for e in by_time["events"])
    assert by_time["events"][-1]["id"] == everything[-1]["id"]
    assert [e["id"] for e in limited] == ids[-2:]
    assert followed and all(e["id"] > last for e in followed)
    assert followed[0]["kind"] == "control" and followed[0]["action"] == "unload"


async def test_mutating_calls_are_recorded_with_the_peers_uid_and_pid(tmp_path: Path) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        await ctl.post("/v1/models/c/pin")
        (event,) = [e for e in run.events.history if e.kind == "control"]
    assert event.model == "c"
    assert dict(event.fields) == {
        "action": "pin",
        "uid": os.getuid(),
        "pid": os.getpid(),
        "result": "accepted",
    }


def _public_dir() -> Path:
    """A directory another uid can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vllmd-ctl-"))
    path.chmod(0o755)
    return path


async def test_a_refused_uid_is_forbidden_to_mutate_may_read_and_is_recorded(
    tmp_path: Path,
) -> None:
    public = _public_dir()
    sock = public / "ctl.sock"
    config = _config(
        tmp_path, control_socket=str(sock), control_socket_mode="0666", control_allow_uids=[4242]
    )
    nobody = 65534

    def curl(method: str, path: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [
                *("curl", "-s", "--unix-socket", str(sock), "-X", method),
                *("-w", "\n%{http_code}", f"http://vllmd{path}"),
            ],
            capture_output=True,
            text=True,
            user=nobody,
            group=nobody,
            timeout=10,
            check=False,
        )
        body, _, code = done.stdout.rpartition("\n")
        return int(code), json.loads(body)

    try:
        async with running(config) as run, control(run) as ctl:
            load = await anyio.to_thread.run_sync(curl, "POST", "/v1/models/a/load")
            read = await anyio.to_thread.run_sync(curl, "GET", "/v1/models/a")
            as_root = await ctl.post("/v1/models/c/pin")  # root may
            refused = [e for e in run.events.history if e.kind == "control" and e.model == "a"]
            state = run.supervisor.get("a").state
    finally:
        sock.unlink(missing_ok=True)
        public.rmdir()
    assert load[0] == 403 and load[1]["error"]["code"] == "forbidden"
    assert read[0] == 200 and read[1]["name"] == "a"
    assert as_root.status_code == 200
    assert state is S.STOPPED
    assert [dict(e.fields) for e in refused] == [
        {"action": "load", "uid": nobody, "pid": refused[0].fields["pid"], "result": "forbidden"}
    ]


async def test_socket_is_created_with_its_mode_and_removed_at_exit(tmp_path: Path) -> None:
    sock = tmp_path / "deep" / "dir" / "ctl.sock"  # the parent is created
    config = _config(tmp_path, control_socket=str(sock), control_socket_mode="0600")
    async with running(config):
        mode = stat.S_IMODE(sock.stat().st_mode)
        is_socket = stat.S_ISSOCK(sock.stat().st_mode)
    assert is_socket and mode == 0o600
    assert not sock.exists()


def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    live = bind_unix(path, 0o660)
    try:
        with pytest.raises(ListenFailed, match="another process answers") as refused:
            bind_unix(path, 0o660)
        assert "daemon.control_socket" in str(refused.value)
    finally:
        live.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ListenFailed, match="not a socket"):
        bind_unix(regular, 0o660)


async def test_metrics_on_the_control_socket(tmp_path: Path) -> None:
    async with running(_config(tmp_path)) as run, control(run) as ctl:
        metrics = await ctl.get("/metrics")
    assert metrics.status_code == 200
    assert "vllmd_model_state" in metrics.text


def _one_rule(tmp_path: Path, rule: dict[str, Any]) -> Config:
    """Model `a` and one alert rule (firing with no wait), evaluated every 100 ms."""
    alerts = {
        "interval": "100ms",
        "alertmanager": [],
        "rules": [{"for": "0s", "severity": "info", **rule}],
    }
    return fake_config(tmp_path, {"a": {}}, alerts=alerts)


async def test_alerts_lists_the_active_alerts_and_status_counts_the_firing_ones(
    tmp_path: Path,
) -> None:
    """A rule that holds at once (queue depth >= 0 of every model, for 0s) fires at the first
    evaluation: `GET /v1/alerts` lists it per model, status counts it, /metrics shows it."""
    rule = {"name": "Always", "signal": "model_queue_depth", "op": ">=", "threshold": 0}
    config = _one_rule(tmp_path, rule)
    async with running(config) as run, control(run) as ctl:
        with anyio.fail_after(5):
            while not (await ctl.get("/v1/alerts")).json()["alerts"]:  # noqa: ASYNC110
                await anyio.sleep(0.05)  # the API is what is watched
        alerts = (await ctl.get("/v1/alerts")).json()["alerts"]
        status = (await ctl.get("/v1/status")).json()
        metrics = (await ctl.get("/metrics")).text
    (always,) = [a for a in alerts if a["labels"]["alertname"] == "Always"]
    assert always["state"] == "firing" and always["labels"]["model"] == "a"
    assert status["alerts_firing"] >= 1
    assert 'alertname="Always"' in metrics and 'alertstate="firing"' in metrics


async def test_the_gateways_time_to_first_byte_feeds_the_ttfb_alert(tmp_path: Path) -> None:
    """The proxy hands each request's time to first byte to the gateway, which counts it in
    the alerts' window with the request: a TTFB rule over 0 s fires after one request."""
    rule = {"name": "SlowFirstByte", "signal": "model_ttfb_p99_seconds", "op": ">"}
    config = _one_rule(tmp_path, {**rule, "threshold": 0, "window": "1m"})
    async with running(config) as run, control(run) as ctl, client(run) as http:
        await anyio.sleep(0.3)  # evaluations before any request: nothing to fire on
        assert not (await ctl.get("/v1/alerts")).json()["alerts"]
        r = await http.post("/v1/completions", json={"model": "a", "prompt": "x"})
        assert r.status_code == 200
        with anyio.fail_after(5):
            while not (await ctl.get("/v1/alerts")).json()["alerts"]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        (alert,) = (await ctl.get("/v1/alerts")).json()["alerts"]
    assert alert["labels"]["alertname"] == "SlowFirstByte" and alert["labels"]["model"] == "a"
    assert alert["value"] > 0
