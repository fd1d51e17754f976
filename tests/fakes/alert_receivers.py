"""Real receivers for the alert tests: an Alertmanager process on a free loopback port, and a
tiny HTTP server that records what is posted to it (a webhook receiver)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

ALERTMANAGER_NAMES = ("prometheus-alertmanager", "alertmanager")  # Debian's name, upstream's
AM_CONFIG = """\
route:
  receiver: blackhole
receivers:
  - name: blackhole
"""


def alertmanager_binary() -> str | None:
    for name in ALERTMANAGER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Alertmanager:
    def __init__(self, url: str, process: anyio.abc.Process) -> None:
        self.url = url
        self.process = process

    async def alerts(self) -> list[dict[str, Any]]:
        """Alertmanager's own view: GET /api/v2/alerts (active, unresolved alerts)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            response = await client.get("/api/v2/alerts")
            response.raise_for_status()
            got: list[dict[str, Any]] = response.json()
            return got

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


@asynccontextmanager
async def alertmanager(tmp: Path) -> AsyncIterator[Alertmanager]:
    """A real Alertmanager on 127.0.0.1, ready, until the block ends."""
    binary = alertmanager_binary()
    if binary is None:
        raise RuntimeError(
            "Alertmanager is not installed (Debian package prometheus-alertmanager): "
            "apt-get install prometheus-alertmanager"
        )
    (tmp / "am.yml").write_text(AM_CONFIG)
    (tmp / "am-data").mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        binary,
        f"--config.file={tmp / 'am.yml'}",
        f"--storage.path={tmp / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with (tmp / "am.log").open("wb") as log:  # the child keeps its own copy of the fd
        process = await anyio.open_process(argv, stdout=subprocess.DEVNULL, stderr=log)
    am = Alertmanager(url, process)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=1) as client:
            with anyio.fail_after(10):
                while True:  # a starting process: the one legitimate poll
                    if process.returncode is not None:
                        raise RuntimeError((tmp / "am.log").read_text())
                    try:
                        if (await client.get("/-/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)
        yield am
    finally:
        await am.stop()


class WebhookReceiver:
    """Every JSON body POSTed to it, in order; `received` fires on each."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.url = ""
        self._changed = anyio.Event()

    async def next_matching(self, status: str, timeout: float = 10) -> dict[str, Any]:
        """The first body received (so far or next) whose status is `status`."""
        with anyio.fail_after(timeout):
            while True:
                for body in self.bodies:
                    if body.get("status") == status:
                        got: dict[str, Any] = body
                        return got
                await self._changed.wait()
                self._changed = anyio.Event()

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += await stream.receive()
            self.bodies.append(json.loads(body))
            self._changed.set()
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    receiver.url = f"http://127.0.0.1:{port}/hook/token"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, receiver.handle)
        yield receiver
        tg.cancel_scope.cancel()
