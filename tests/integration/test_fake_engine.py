"""The fake vLLM engine behaves as the integration tests of vllmd expect."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_engine.py"


class Fake:
    def __init__(self, tmp: Path, args: list[str], env: dict[str, str], uds: bool) -> None:
        self.tmp, self.events_file = tmp, tmp / "events"
        self.sock: str | None = None
        if uds:
            self.sock = str(tmp / "engine.sock")
            args = [*args, "--uds", self.sock]
            self.transport = httpx.HTTPTransport(uds=self.sock)
            self.base_url = "http://engine"
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            args = [*args, "--host", "127.0.0.1", "--port", str(port)]
            self.transport = httpx.HTTPTransport()
            self.base_url = f"http://127.0.0.1:{port}"
        full_env = {**os.environ, "FAKE_EVENTS_FILE": str(self.events_file), **env}
        self.out, self.err = open(tmp / "stdout", "wb"), open(tmp / "stderr", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), *args],
            env=full_env,
            stdout=self.out,
            stderr=self.err,
            start_new_session=True,
        )
        self.client = httpx.Client(transport=self.transport, base_url=self.base_url, timeout=5)

    def listening(self) -> bool:
        # Probe with a plain socket: httpcore 1.0.9's sync transport leaks the socket of a
        # failed unix-socket connect (ResourceWarning, an error under filterwarnings=error).
        family, addr = (
            (socket.AF_UNIX, self.sock)
            if self.sock
            else (socket.AF_INET, ("127.0.0.1", int(self.base_url.rsplit(":", 1)[1])))
        )
        with socket.socket(family, socket.SOCK_STREAM) as s:
            return s.connect_ex(addr) == 0

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"fake exited with {self.proc.returncode}"
            if self.listening() and self.client.get("/health").status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("fake engine not ready")

    def events(self) -> list[str]:
        return self.events_file.read_text().splitlines() if self.events_file.exists() else []

    def stdout(self) -> str:
        return (self.tmp / "stdout").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.tmp / "stderr").read_text(errors="replace")

    def close(self) -> None:
        self.client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.out.close()
        self.err.close()


StartFake = Callable[..., Fake]


@pytest.fixture
def start_fake(tmp_path: Path) -> Iterator[StartFake]:
    fakes: list[Fake] = []

    def start(*args: str, env: dict[str, str] | None = None, uds: bool = True) -> Fake:
        tmp = tmp_path / f"fake{len(fakes)}"
        tmp.mkdir()
        fakes.append(Fake(tmp, list(args), env or {}, uds))
        return fakes[-1]

    yield start
    for fake in fakes:
        fake.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def chat(max_tokens: int = 3, model: str = "tiny", **extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": "a secret prompt"}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, **extra}


def test_uds_serves_the_openai_routes(start_fake: StartFake, tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    fake = start_fake(
        "--model", "/models/tiny", "--served-model-name", "tiny", "alias", "--max-model-len", "256",
        "--enforce-eager", "--dtype", "bfloat16",
        env={"FAKE_STARTUP_DELAY": "0.5", "FAKE_STARTS_FILE": str(starts)},
    )  # fmt: skip
    assert not fake.listening()  # refused while "loading"
    fake.wait_ready()
    assert starts.read_text() == f"{fake.proc.pid}\n"
    health = fake.client.get("/health")
    assert (health.status_code, health.content) == (200, b"")

    models = fake.client.get("/v1/models").json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [
        ("tiny", 256),
        ("alias", 256),
    ]

    r = fake.client.post(
        "/v1/chat/completions", json=chat(model="alias"), headers={"X-Request-Id": "r1"}
    )
    body = r.json()
    assert r.headers["x-request-id"] == "r1"
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3

    lines = []
    with fake.client.stream("POST", "/v1/chat/completions", json=chat(7, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) == 7
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"

    r = fake.client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "NotFoundError" and r.json()["error"]["code"] == 404
    done = fake.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()
    assert done["object"] == "text_completion" and done["usage"]["completion_tokens"] == 2

    vectors = [
        fake.client.post("/v1/embeddings", json={"input": text}).json()["data"][0]["embedding"]
        for text in ("a", "a", "b")
    ]
    assert len(vectors[0]) == 384 and vectors[0] == vectors[1] != vectors[2]
    tokens = fake.client.post("/tokenize", json={"prompt": "héllo"}).json()["tokens"]
    assert fake.client.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "héllo"
    metrics = fake.client.get("/metrics").text
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0' in metrics
    assert "vllm:generation_tokens_total" in metrics
    assert fake.client.post("/sleep?level=1").status_code == 404  # no dev mode

    fake.proc.send_signal(signal.SIGTERM)
    assert fake.proc.wait(3) == 0
    assert "request /v1/chat/completions r1" in fake.events() and fake.events()[-1] == "sigterm"
    assert "Starting vLLM server on unix:" in fake.stdout()
    assert "secret" not in fake.stdout() + fake.stderr()


def test_tcp_api_key(start_fake: StartFake) -> None:
    fake = start_fake("--model", "m", "--api-key", "sekret", uds=False)
    fake.wait_ready()
    assert fake.client.get("/v1/models").status_code == 401
    bad = fake.client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    ok = fake.client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"


def test_crash_at_start(start_fake: StartFake) -> None:
    fake = start_fake("--model", "m", env={"FAKE_MODE": "crash_at_start"})
    assert fake.proc.wait(10) == 3
    assert "cannot load model" in fake.stderr()


def test_crash_after_requests(start_fake: StartFake) -> None:
    fake = start_fake("--model", "m", env={"FAKE_MODE": "crash_after_requests:2"})
    fake.wait_ready()
    assert fake.client.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    with pytest.raises(httpx.TransportError):
        fake.client.post("/v1/completions", json={"prompt": "x"})
    assert fake.proc.wait(5) == 1


def test_unhealthy_after(start_fake: StartFake) -> None:
    fake = start_fake("--model", "m", env={"FAKE_MODE": "unhealthy_after:1.5"})
    fake.wait_ready()
    wait_for(lambda: fake.client.get("/health").status_code == 500)


def test_hang_never_listens_but_stops_on_sigterm(start_fake: StartFake) -> None:
    fake = start_fake("--model", "m", env={"FAKE_MODE": "hang", "FAKE_STARTUP_DELAY": "0"})
    with pytest.raises(AssertionError, match="not ready"):
        fake.wait_ready(timeout=2)  # by then its SIGTERM handler is in place
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.proc.wait(3) == 0 and fake.events() == ["sigterm"]


def test_ignore_sigterm(start_fake: StartFake) -> None:
    fake = start_fake("--model", "m", env={"FAKE_MODE": "ignore_sigterm"})
    fake.wait_ready()
    fake.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert fake.proc.poll() is None
    assert fake.client.get("/health").status_code == 200


def test_spawned_children(start_fake: StartFake, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    env = {"FAKE_SPAWN_CHILDREN": "1", "FAKE_PIDS_FILE": str(pids_file)}
    fake = start_fake("--model", "m", env=env)
    wait_for(pids_file.exists)
    pids = {
        kind: int(pid)
        for pid, kind in (line.split() for line in pids_file.read_text().splitlines())
    }
    try:
        assert os.getpgid(pids["in-group"]) == fake.proc.pid
        assert os.getsid(pids["escaped"]) == pids["escaped"] != fake.proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids["escaped"], signal.SIGKILL)


def test_sleep_and_wake_cycle(start_fake: StartFake) -> None:
    fake = start_fake("--model", "m", "--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1"})
    fake.wait_ready()
    c = fake.client

    def sleeping() -> bool:
        return bool(c.get("/is_sleeping").json()["is_sleeping"])

    def infer() -> int:
        return c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code

    assert not sleeping() and infer() == 200
    assert c.post("/sleep", params={"level": 1}).status_code == 200
    assert sleeping() and infer() == 500
    assert 'sleep_state="weights_offloaded"} 1.0' in c.get("/metrics").text
    assert c.post("/wake_up").status_code == 200
    assert not sleeping() and infer() == 200

    assert c.post("/sleep", params={"level": 2}).status_code == 200
    assert c.post("/wake_up", params={"tags": "weights"}).status_code == 200
    assert sleeping() and infer() == 500
    rpc = c.post("/collective_rpc", json={"method": "reload_weights"})
    assert (rpc.status_code, rpc.json()) == (200, {"results": [None]})
    assert c.post("/wake_up", params={"tags": "kv_cache"}).status_code == 200
    assert c.post("/reset_prefix_cache").status_code == 200
    assert not sleeping() and infer() == 200
    marks = [e for e in fake.events() if e.startswith(("sleep", "wake"))]
    assert marks == ["sleep 1", "wake all", "sleep 2", "wake weights", "wake kv_cache"]


def test_cancelled_stream_is_recorded(start_fake: StartFake) -> None:
    env = {"FAKE_TOKEN_DELAY": "0.05"}
    fake = start_fake("--model", "m", "--served-model-name", "tiny", env=env)
    fake.wait_ready()
    body = chat(1000, stream=True)
    with fake.client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "gone"}
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        running = fake.client.get("/metrics").text
        assert 'vllm:num_requests_running{engine="0",model_name="tiny"} 1.0' in running
    wait_for(lambda: "cancelled gone" in fake.events())
    assert (
        'num_requests_running{engine="0",model_name="tiny"} 0.0' in fake.client.get("/metrics").text
    )
