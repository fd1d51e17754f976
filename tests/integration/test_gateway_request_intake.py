"""What the gateway does with requests that arrive oddly, through the whole daemon (issue 21):
a body that stalls is answered 408 `request_timeout` and its connection closed (so stalled
clients cannot hold every slot), also with a timeout changed by a reload; a chunked body over
`max_body` is a 413 and a close, not a connection that reads on; an upgrade request is served
as plain HTTP/1.1 with its body; `HEAD` of the probes is their `GET` without the body."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from tests.integration.harness import FAKE_ENGINE, fake_config, running
from vllmd.config import load_config
from vllmd.daemon import Running

pytestmark = pytest.mark.anyio

STALLED = b'POST /v1/completions HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n{"mo'


async def _connect(run: Running) -> anyio.abc.SocketStream:
    url = httpx.URL(run.gateway_url)
    assert url.host and url.port
    return await anyio.connect_tcp(url.host, url.port)


async def _read_to_close(stream: anyio.abc.SocketStream) -> bytes:
    out = b""
    while True:
        try:
            out += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return out


async def _health(run: Running) -> int:
    async with httpx.AsyncClient(base_url=run.gateway_url, timeout=5) as http:
        return (await http.get("/health")).status_code


def _error(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    error: dict[str, object] = json.loads(body)["error"]
    return status, error


async def test_stalled_bodies_get_408_and_a_close_so_new_requests_are_served(
    tmp_path: Path,
) -> None:
    """Regression: connections that sent a head and part of the body held their slot for
    good; with every slot taken, `GET /health` got 503."""
    gateway = {"max_connections": 4, "client_body_timeout": "500ms"}
    async with running(fake_config(tmp_path, {"m": {}}, gateway=gateway)) as run:
        streams = [await _connect(run) for _ in range(4)]
        for stream in streams:
            await stream.send(STALLED)
        await anyio.sleep(0.1)
        refused = await _health(run)  # every slot is held by a stalled body
        answers = []
        with anyio.fail_after(5):
            for stream in streams:
                answers.append(await _read_to_close(stream))  # the server closes it
                await stream.aclose()
        served = await _health(run)
        rejected = run.metrics.registry.get_sample_value(
            "vllmd_requests_rejected_total", {"model": "", "reason": "request_timeout"}
        )
    assert refused == 503
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"connection: close\r\n" in answer
        status, error = _error(answer)
        assert status == 408
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert served == 200
    assert rejected == 4


async def test_a_client_body_timeout_changed_by_a_reload_applies_to_the_next_body(
    tmp_path: Path,
) -> None:
    path = tmp_path / "vllmd.toml"
    config = f"""
[daemon]
state_dir = "state"
control_socket = "ctl.sock"
[gateway]
listen = "127.0.0.1:0"
client_body_timeout = "1h"
[engine]
command = ["{sys.executable}", "{FAKE_ENGINE}"]
model_flag = "--model"
[devices.cpu0]
kind = "cpu"
memory = "64GiB"
"""
    path.write_text(config)
    async with running(load_config(path)) as run:
        before = await _connect(run)
        await before.send(STALLED)
        with anyio.move_on_after(1):
            await before.receive()
            pytest.fail("answered although the timeout was an hour")
        path.write_text(config.replace('"1h"', '"300ms"'))
        transport = httpx.AsyncHTTPTransport(uds=str(run.control_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as ctl:
            assert (await ctl.post("/v1/reload")).status_code == 200
        after = await _connect(run)
        await after.send(STALLED)
        started = time.monotonic()
        with anyio.fail_after(3):
            answer = await _read_to_close(after)
        waited = time.monotonic() - started
        await after.aclose()
        await before.aclose()
    assert answer.startswith(b"HTTP/1.1 408 ") and waited < 2


async def test_a_chunked_body_over_max_body_is_a_413_and_the_connection_closes_at_once(
    tmp_path: Path,
) -> None:
    """Regression: after the 413 the connection went on reading (and throwing away) the
    client's chunks until it had been idle for 5 s: 9.4 GB on one connection."""
    config = fake_config(tmp_path, {"m": {}}, gateway={"max_body": "1KiB"})
    async with running(config) as run, await _connect(run) as stream:
        await stream.send(
            b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        answer = b""

        async def send_forever() -> None:
            chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
            try:
                while True:
                    await stream.send(chunk)
                    await anyio.sleep(0.01)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_forever)
            with anyio.fail_after(5):
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
            answered = time.monotonic()
            with anyio.fail_after(5):
                answer += await _read_to_close(stream)
            closed_after = time.monotonic() - answered
            tg.cancel_scope.cancel()
    status, error = _error(answer)
    assert status == 413 and error["code"] == "body_too_large"
    assert b"connection: close\r\n" in answer
    assert closed_after < 1


@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket"])
async def test_an_upgrade_request_to_a_model_route_is_served_with_its_body(
    tmp_path: Path, upgrade: bytes
) -> None:
    """Regression: `curl --http2` to a POST route (and `Upgrade: websocket`) got 400 "not
    valid JSON": the body was lost. Naming an unknown model shows the body was read."""
    body = json.dumps({"model": "nope", "prompt": "x"}).encode()
    async with running(fake_config(tmp_path, {"m": {}})) as run, await _connect(run) as stream:
        await stream.send(
            b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: " + upgrade + b"\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        answer = b""
        with anyio.fail_after(5):
            while not answer.endswith(b"}"):
                answer += await stream.receive()
    status, error = _error(answer)
    assert (status, error["code"]) == (404, "model_not_found")


async def test_head_of_health_and_ready_is_their_get_without_the_body(tmp_path: Path) -> None:
    """Regression: `HEAD /health` and `HEAD /ready` answered 404."""
    async with (
        running(fake_config(tmp_path, {"m": {}})) as run,
        httpx.AsyncClient(base_url=run.gateway_url, timeout=5) as http,
    ):
        pairs = [(await http.get(path), await http.head(path)) for path in ("/health", "/ready")]
    for get, head in pairs:
        assert head.status_code == get.status_code == 200
        assert head.content == b"" and get.content
        assert head.headers["content-length"] == str(len(get.content))
        assert head.headers["content-type"] == get.headers["content-type"]
