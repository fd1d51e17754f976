"""The state store inside a running daemon: `GET /v1/events` reads it (ids continue from the
previous run), and a database another program locks degrades it visibly (the gauge, the
default `VllmdStateStoreDegraded` alert) while the gateway keeps serving."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest

from tests.integration.harness import client, control, eventually, fake_config, running
from vllmd.events import Kind

pytestmark = pytest.mark.anyio


async def test_events_come_from_the_store_and_ids_continue_across_restarts(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {}})
    async with running(config) as run, control(run) as ctl:
        assert (await ctl.post("/v1/models/a/load")).status_code == 200
        first = (await ctl.get("/v1/events", params={"limit": "1000"})).json()["events"]
    async with running(config) as run, control(run) as ctl:
        await eventually(lambda: run.supervisor.get("a").state.value == "ready", 15)
        events = (await ctl.get("/v1/events", params={"limit": "1000"})).json()["events"]
        since = (await ctl.get("/v1/events", params={"since": str(first[-1]["id"])})).json()
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and [e["id"] for e in first] == ids[: len(first)]
    kinds = [e["kind"] for e in events[len(first) :]]
    assert "spawned" in kinds  # a loads on purpose again after the restart
    assert since["events"] and all(e["id"] > first[-1]["id"] for e in since["events"])


async def test_a_locked_database_degrades_the_store_and_the_gateway_keeps_serving(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, {"a": {}}, alerts={"interval": "100ms", "alertmanager": []})
    async with running(config) as run, control(run) as ctl:
        holder = sqlite3.connect(tmp_path / "state" / "vllmd.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
        try:
            async with client(run) as http:
                body = {"model": "a", "prompt": "x", "max_tokens": 1}
                assert (await http.post("/v1/completions", json=body)).status_code == 200

                async def degraded() -> bool:
                    text = (await ctl.get("/metrics")).text
                    return "vllmd_state_store_degraded 1.0" in text

                with anyio.fail_after(15):
                    while not await degraded():  # noqa: ASYNC110 - the API is watched
                        await anyio.sleep(0.1)

                async def firing() -> set[str]:
                    alerts = (await ctl.get("/v1/alerts")).json()["alerts"]
                    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

                with anyio.fail_after(5):
                    while "VllmdStateStoreDegraded" not in await firing():  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                assert (await http.post("/v1/completions", json=body)).status_code == 200
                # Not written yet (the file is locked), the events are read from memory.
                events = (await ctl.get("/v1/events")).json()["events"]
                assert any(
                    e["kind"] == "alert"
                    and e["alertname"] == "VllmdStateStoreDegraded"
                    and e["alertstate"] == "firing"
                    for e in events
                )
        finally:
            holder.execute("ROLLBACK")
            holder.close()


async def test_a_follower_from_an_old_id_gets_every_stored_event_then_the_new_ones(
    tmp_path: Path,
) -> None:
    """More events than one page (1,000) and than the bus's memory: all come, in order."""
    config = fake_config(tmp_path, {"a": {}})
    async with running(config) as run, control(run) as ctl:
        ids = [run.events.emit(Kind.CONTROL, "a", action="test", n=i).id for i in range(2500)]

        def stored() -> bool:
            with sqlite3.connect(tmp_path / "state" / "vllmd.db") as conn:
                (count,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
            return bool(count >= 2500)

        await eventually(stored, 10)
        got: list[int] = []
        params = {"since": "0", "follow": "1"}
        with anyio.fail_after(15):
            async with ctl.stream("GET", "/v1/events", params=params) as response:
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    got.append(json.loads(line)["id"])
                    if got[-1] == ids[-1]:
                        late = run.events.emit(Kind.CONTROL, "a", action="late").id
                    if len(got) > 1 and got[-2] == ids[-1]:
                        break
    wanted = set(ids)
    assert [i for i in got if i in wanted] == ids
    assert got == sorted(got) and got[-1] == late
