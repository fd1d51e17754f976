"""The daemon's TCP listeners: the gateway, the optional metrics listener, and what a failed
bind leaves behind (nothing)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import fake_config, running
from vllmd.daemon import serve
from vllmd.devices import DeclaredProbe
from vllmd.errors import ListenFailed
from vllmd.wiring import Seams

pytestmark = pytest.mark.anyio


@contextmanager
def occupied_port() -> Iterator[int]:
    """A port another program listens on for the duration of the block."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_metrics_listener_serves_only_metrics(tmp_path: Path) -> None:
    """`[metrics] listen` was parsed and ignored: now a second listener, /metrics only."""
    config = fake_config(tmp_path, {"m": {}}, metrics={"listen": "127.0.0.1:0"})
    async with running(config) as run:
        assert run.metrics_url is not None and run.metrics_url != run.gateway_url
        async with httpx.AsyncClient(base_url=run.metrics_url, timeout=10) as http:
            scrape = await http.get("/metrics")
            engines = await http.get("/metrics/engines")
            others = [
                await http.get("/health"),
                await http.get("/v1/models"),
                await http.post("/metrics"),
                await http.post("/v1/completions", json={"model": "m", "prompt": "x"}),
            ]
        async with httpx.AsyncClient(base_url=run.gateway_url, timeout=10) as http:
            on_gateway = await http.get("/metrics")
            engines_on_gateway = await http.get("/metrics/engines")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    assert 'vllmd_model_state{model="m",state="stopped"} 1.0' in scrape.text
    assert "vllmd_build_info" in scrape.text
    assert [r.status_code for r in others] == [404] * len(others)
    assert on_gateway.status_code == 404  # served on its own listener only
    assert engines.status_code == 200 and "vllmd_engine_scrape_success" in engines.text
    assert engines_on_gateway.status_code == 404
    assert all(r.json()["error"]["code"] == "not_found" for r in others)
    assert run.supervisor.instances["m"].pgid() is None  # nothing reached an engine


async def test_without_metrics_listen_there_is_no_second_listener(tmp_path: Path) -> None:
    async with running(fake_config(tmp_path, {"m": {}})) as run:
        assert run.metrics_url is None


async def test_failed_bind_undoes_everything_made_before(tmp_path: Path) -> None:
    """The runtime directory leaked when binding failed; so would the gateway's socket when
    the metrics listener's bind failed after it."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    gateway_port = _free_port()
    with occupied_port() as busy:
        config = fake_config(
            tmp_path,
            {"m": {}},
            gateway={"listen": f"127.0.0.1:{gateway_port}"},
            metrics={"listen": f"127.0.0.1:{busy}"},
        )
        seams = Seams(
            probe=DeclaredProbe(config.devices), base_env={"RUNTIME_DIRECTORY": str(runtime)}
        )

        async def never() -> None:
            raise AssertionError("the daemon must not get as far as waiting for a shutdown")

        with pytest.raises(ListenFailed) as failed:
            await serve(config, never, seams)
    assert str(failed.value).startswith(f"cannot listen on 127.0.0.1:{busy} (metrics.listen): ")
    assert list(runtime.iterdir()) == []
    assert _bindable(gateway_port)
