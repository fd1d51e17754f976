"""Reload through the whole daemon (fake engines): `POST /v1/reload`, SIGHUP and `vllmctl
reload` read the file again; unchanged models keep their engine (same pid), engine-changing
ones restart, removed ones stop, new ones appear; a bad file changes nothing and says why."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import pytest

from tests.integration.harness import client, control, fake_model, running, write_fake_config
from vllmd.config import load_config

pytestmark = pytest.mark.anyio
VLLMCTL = [sys.executable, "-m", "vllmd.cli.vllmctl"]


def _write(tmp_path: Path, models: str, listen: str = "127.0.0.1:0") -> Path:
    gateway, engine = 'queue_timeout = "20s"', 'drain_timeout = "1s"'
    path = tmp_path / "vllmd.toml"
    return write_fake_config(path, models, gateway=gateway, engine=engine, listen=listen)


def _model(name: str, extra: str = "") -> str:
    return fake_model(name, extra, cpus=None)


def _req(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "x", "max_tokens": 1}


async def test_reload_keeps_unchanged_engines_restarts_changed_ones_removes_and_adds(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, _model("keep") + _model("grow") + _model("gone"))
    async with running(load_config(path)) as run, client(run) as http, control(run) as ctl:
        for name in ("keep", "grow", "gone"):
            assert (await http.post("/v1/completions", json=_req(name))).status_code == 200
        pids = {n: run.supervisor.status(run.supervisor.get(n)).pid for n in ("keep", "grow")}
        path.write_text(
            path.read_text()
            .replace(_model("gone"), _model("new"))
            .replace(_model("keep"), _model("keep", 'aliases = ["kept"]\nidle_ttl = "1h"'))
            .replace(_model("grow"), _model("grow").replace('"3GiB"', '"4GiB"'))
        )
        answer = await ctl.post("/v1/reload")
        with anyio.fail_after(10):
            await run.supervisor.get("grow").wait_state(run.supervisor.get("grow").state.READY)
        keep = run.supervisor.status(run.supervisor.get("kept"))
        grow = run.supervisor.status(run.supervisor.get("grow"))
        new = run.supervisor.status(run.supervisor.get("new"))
        gone = await http.post("/v1/completions", json=_req("gone"))
        by_alias = await http.post("/v1/completions", json=_req("kept"))
        gauge = run.metrics.registry.get_sample_value("vllmd_config_last_reload_successful")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "reloaded": True,
        "added": ["new"],
        "removed": ["gone"],
        "restarted": ["grow"],
        "live": ["keep"],
        "changed": [
            "models.gone",
            "models.grow.memory",
            "models.keep.aliases",
            "models.keep.idle_ttl",
            "models.new",
        ],
    }
    assert keep.pid == pids["keep"] and keep.model.idle_ttl == 3600
    assert grow.pid is not None and grow.pid != pids["grow"] and grow.held_bytes == 4 * 2**30
    assert new.state.value == "stopped"
    assert gone.status_code == 404 and by_alias.status_code == 200
    assert gauge == 1.0


async def test_a_reload_of_gateway_keys_names_them_and_never_a_value(tmp_path: Path) -> None:
    """api_keys and max_queue are applied without touching a model: the reply and the
    `reloaded` event name both key paths, and the key itself appears in neither."""
    secret = "sk-reload-secret-0123456789"
    path = _write(tmp_path, _model("m"))
    keyed = f'queue_timeout = "20s"\napi_keys = ["{secret}"]\nmax_queue = 7'
    async with running(load_config(path)) as run, client(run) as http, control(run) as ctl:
        path.write_text(path.read_text().replace('queue_timeout = "20s"', keyed))
        answer = await ctl.post("/v1/reload")
        events = await ctl.get("/v1/events")
        (event,) = [e for e in run.events.history if e.kind == "reloaded"]
        keyless = await http.post("/v1/completions", json=_req("m"))
        auth = {"Authorization": f"Bearer {secret}"}
        with_key = await http.post("/v1/completions", json=_req("m"), headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["changed"] == ["gateway.api_keys", "gateway.max_queue"]
    assert event.fields["keys"] == ["gateway.api_keys", "gateway.max_queue"]
    assert secret not in answer.text and secret not in events.text
    assert secret not in json.dumps(event.as_dict())
    assert (keyless.status_code, with_key.status_code) == (401, 200)  # applied, not only told


async def test_a_bad_file_or_a_refused_key_changes_nothing_and_names_the_problem(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, _model("m"))
    good = path.read_text()
    async with running(load_config(path)) as run, client(run) as http, control(run) as ctl:
        assert (await http.post("/v1/completions", json=_req("m"))).status_code == 200
        pid = run.supervisor.status(run.supervisor.get("m")).pid
        path.write_text(good.replace('memory = "3GiB"', 'memory = "3 G"'))
        bad = await ctl.post("/v1/reload")
        gauge_bad = run.metrics.registry.get_sample_value("vllmd_config_last_reload_successful")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path.write_text(good.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
        refused = await ctl.post("/v1/reload")
        path.write_text(good)
        fine = await ctl.post("/v1/reload")
        after = run.supervisor.status(run.supervisor.get("m"))
        gauge_fine = run.metrics.registry.get_sample_value("vllmd_config_last_reload_successful")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "config_invalid"
    assert any("models.m.memory" in p for p in bad.json()["error"]["problems"])
    assert refused.status_code == 422
    assert "gateway.listen: cannot change on reload" in refused.json()["error"]["message"]
    assert fine.status_code == 200 and fine.json()["live"] == []
    assert after.pid == pid
    assert (gauge_bad, gauge_fine) == (0.0, 1.0)


async def test_sighup_reloads_and_systemd_hears_reloading_then_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    path = _write(tmp_path, _model("m"))
    try:
        async with running(load_config(path)) as run:
            path.write_text(path.read_text() + _model("added"))
            os.kill(os.getpid(), signal.SIGHUP)
            with anyio.fail_after(5):
                while "added" not in run.supervisor.instances:  # noqa: ASYNC110
                    await anyio.sleep(0.02)  # the signal's effect is what is watched
            await anyio.sleep(0.1)
            messages = []
            while True:
                try:
                    messages.append(sock.recv(65536).decode())
                except BlockingIOError:
                    break
    finally:
        sock.close()
    reloading = next(i for i, m in enumerate(messages) if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in messages[reloading]
    assert any(m.startswith("READY=1") for m in messages[reloading + 1 :])


async def test_vllmctl_reload_reports_a_bad_file_and_exits_1(tmp_path: Path) -> None:
    path = _write(tmp_path, _model("m"))
    async with running(load_config(path)) as run:
        where = ["--socket", str(run.control_socket)]
        ok = await anyio.run_process([*VLLMCTL, *where, "reload"], check=False)
        path.write_text(path.read_text() + "\n[models.m2]\nmemory = 1\n")
        bad = await anyio.run_process([*VLLMCTL, *where, "reload"], check=False)
    assert ok.returncode == 0 and ok.stdout.decode().strip() == "reloaded: nothing changed"
    assert bad.returncode == 1
    assert "models.m2" in bad.stderr.decode()


async def test_a_reload_while_a_sized_models_files_are_away_keeps_it_serving(
    tmp_path: Path,
) -> None:
    """memory = "auto" sized the model at start; its weights vanish (a pruned cache, a revision
    half downloaded); a reload for another model keeps its engine (same pid), not a stop into
    a 503."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    shape = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
    shape |= {"num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 256}
    shape |= {"max_position_embeddings": 256, "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(shape))
    (directory / "model.safetensors").write_bytes(b"\0" * 4096)
    sized = '[models.s]\nmodel = "./tiny"\ndevices = ["cpu0"]\ncpus = 0\n'
    path = _write(tmp_path, sized)
    async with running(load_config(path)) as run, client(run) as http, control(run) as ctl:
        assert (await http.post("/v1/completions", json=_req("s"))).status_code == 200
        pid = run.supervisor.status(run.supervisor.get("s")).pid
        (directory / "model.safetensors").unlink()
        path.write_text(path.read_text() + _model("other"))
        answer = await ctl.post("/v1/reload")
        assert answer.status_code == 200, answer.text
        assert answer.json()["restarted"] == [] and answer.json()["added"] == ["other"]
        assert (await http.post("/v1/completions", json=_req("s"))).status_code == 200
        assert run.supervisor.status(run.supervisor.get("s")).pid == pid
