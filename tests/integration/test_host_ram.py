"""The host RAM a level-1 sleeper holds, through the whole daemon on the fake GPU (see
tests/fakes/fake_gpu.py: its workers hold FAKE_GPU_WEIGHTS_BYTES while asleep at level 1): a
measurement belongs to the weights it measured (checkpoint, dtype, args, GPU count), so a
reload that changes them, or a restart with the changed config, budgets the new checkpoint's
size until a level-1 sleep measures again; a rise implausible against the checkpoint is not
kept."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from tests.fakes.fake_gpu import FakeGpu
from tests.integration.harness import client, fake_config, running
from vllmd.config import Config
from vllmd.config.diff import plan_reload
from vllmd.events import Event

pytestmark = pytest.mark.anyio
GiB = 2**30
MiB = 2**20


def _checkpoint(directory: Path, size: int) -> str:
    """A local model directory whose weights are `size` bytes (a sparse file: only its size
    is read, never its bytes)."""
    directory.mkdir(parents=True)
    with open(directory / "model.safetensors", "wb") as f:
        f.truncate(size)
    return str(directory)


def _small(tmp_path: Path) -> str:
    return _checkpoint(tmp_path / "small", 80 * MiB)


def _big(tmp_path: Path) -> str:
    return _checkpoint(tmp_path / "big", 512 * MiB)


def _config(
    tmp_path: Path, a: Mapping[str, object], host_memory: str, weights: int | None = None
) -> Config:
    """8 GiB models a, b, c on the fake GPU "0" (two fit, not three); `a` as given, its
    engine's loaded weights `weights` bytes. b and c have no checkpoint to size: their 8 GiB
    reservation bounds their host RAM, so they never sleep at level 1 on a small budget."""
    env = {} if weights is None else {"env": {"FAKE_GPU_WEIGHTS_BYTES": str(weights)}}
    models: dict[str, Mapping[str, object]] = {"a": {**a, **env}, "b": {}, "c": {}}
    specs = {name: {"devices": ["0"], "memory": "8GiB", **spec} for name, spec in models.items()}
    scheduler = {"headroom": "1GiB", "min_residency": "0s", "sleep_residue": "1GiB"}
    return fake_config(
        tmp_path, specs, devices={}, scheduler={**scheduler, "host_memory": host_memory}
    )


def _events(history: list[Event], kind: str, model: str) -> list[Event]:
    return [e for e in history if e.kind == kind and e.model == model]


async def _post_all(http: httpx.AsyncClient, *models: str) -> None:
    for name in models:
        r = await http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200, (name, r.text)


async def test_a_reload_that_changes_the_checkpoint_drops_the_measured_host_ram(
    tmp_path: Path,
) -> None:
    """`a` (an 80 MiB checkpoint) is measured at 96 MiB by its first level-1 sleep, within the
    256 MiB budget. A reload points it at a 512 MiB checkpoint: its next sleep is budgeted by
    that (level 2: it does not fit), not by the old figure nor the old checkpoint's size."""
    gpu = FakeGpu(tmp_path / "gpu")
    before = _config(tmp_path, {"model": _small(tmp_path)}, "256MiB", weights=96 * MiB)
    after = _config(tmp_path, {"model": _big(tmp_path)}, "256MiB", weights=160 * MiB)
    async with running(before, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")  # a sleeps for c, at level 1
        (measured,) = _events(list(run.events.history), "sleep_measured", "a")
        reloaded_at = len(run.events.history)
        await run.supervisor.apply(after, plan_reload(before, after))
        await _post_all(http, "a", "b", "c")  # a (restarted by the reload) is evicted for c
        reloaded = list(run.events.history)[reloaded_at:]
    evicting = _events(reloaded, "evicting", "a")
    assert evicting and all(e.fields["level"] == 2 for e in evicting)
    assert not _events(reloaded, "sleep_measured", "a")
    assert measured.fields["host_bytes"] == pytest.approx(96 * MiB, abs=12 * MiB)
    assert measured.fields["checkpoint_bytes"] == 80 * MiB


async def test_a_stored_figure_is_not_used_for_another_checkpoint_after_a_restart(
    tmp_path: Path,
) -> None:
    """The store's figure was measured for the 80 MiB checkpoint: a daemon restarted with `a`
    pointed at a 512 MiB one budgets that (level 2 on 256 MiB). Once a level-1 sleep measures
    the new weights (a roomy budget), that figure, with its own fingerprint, holds across the
    next restart: level 1 on 256 MiB again, not measured again."""
    gpu = FakeGpu(tmp_path / "gpu")
    small, big = _small(tmp_path), _big(tmp_path)
    before = _config(tmp_path, {"model": small}, "256MiB", weights=96 * MiB)
    after = _config(tmp_path, {"model": big}, "256MiB", weights=160 * MiB)
    roomy = _config(tmp_path, {"model": big}, "16GiB", weights=160 * MiB)
    histories = []
    for config in (before, after, roomy, after):
        async with running(config, gpu.env(), probe=gpu) as run, client(run) as http:
            await _post_all(http, "a", "b", "c")  # a is evicted for c
            histories.append(list(run.events.history))
    levels = [[e.fields["level"] for e in _events(h, "evicting", "a")] for h in histories]
    assert levels == [[1], [2], [1], [1]]
    measured = [_events(h, "sleep_measured", "a") for h in histories]
    assert [len(m) for m in measured] == [1, 0, 1, 0]
    first, again = measured[0][0].fields, measured[2][0].fields
    assert again["host_bytes"] == pytest.approx(160 * MiB, abs=12 * MiB)
    assert (again["checkpoint_bytes"], first["checkpoint_bytes"]) == (512 * MiB, 80 * MiB)
    assert again["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize(
    ("checkpoint", "weights", "tight", "budget", "why"),
    [
        (GiB, 48 * MiB, "512MiB", GiB, "under a quarter of the checkpoint"),
        (None, 4 * MiB, "1GiB", 8 * GiB, "noise"),  # no checkpoint to go by: its reservation
    ],
)
async def test_a_rise_that_cannot_be_the_weights_is_not_kept(
    tmp_path: Path, checkpoint: int | None, weights: int, tight: str, budget: int, why: str
) -> None:
    """`a`'s level-1 sleep raises its engine's RSS by far less than its checkpoint (a 1 GiB
    one; or, with none to size, by less than noise): not kept (log `sleep_host_unmeasured`
    with the reason, no event), so after a restart with a tight budget `a` is still budgeted
    by its checkpoint (else its reservation) and sleeps at level 2, not at level 1 on the
    tiny figure."""
    gpu = FakeGpu(tmp_path / "gpu")
    a = {} if checkpoint is None else {"model": _checkpoint(tmp_path / "ckpt", checkpoint)}
    roomy = _config(tmp_path, a, "16GiB", weights=weights)
    with capture_logs() as logs:
        async with running(roomy, gpu.env(), probe=gpu) as run, client(run) as http:
            await _post_all(http, "a", "b", "c")  # a sleeps for c, at level 1
            first = list(run.events.history)
    (evicting,) = _events(first, "evicting", "a")
    assert evicting.fields["level"] == 1
    assert not _events(first, "sleep_measured", "a")
    (unmeasured,) = [e for e in logs if e["event"] == "sleep_host_unmeasured"]
    assert unmeasured["model"] == "a"
    assert why in unmeasured["reason"]
    assert unmeasured["budget_bytes"] == budget

    restarted = _config(tmp_path, a, tight, weights=weights)
    async with running(restarted, gpu.env(), probe=gpu) as run, client(run) as http:
        await _post_all(http, "a", "b", "c")
        second = list(run.events.history)
    (evicting,) = _events(second, "evicting", "a")
    assert evicting.fields["level"] == 2
