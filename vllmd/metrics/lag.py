"""The event loop's lag: how late a timer fires. Everything the daemon does runs on one loop;
a blocking call anywhere shows here first."""

from __future__ import annotations

from typing import Protocol

import anyio
from anyio.abc import TaskStatus


class LagSink(Protocol):
    """Where the lag goes (`Metrics`)."""

    def loop_lag(self, seconds: float) -> None: ...


async def run_lag_monitor(
    metrics: LagSink,
    interval: float = 1.0,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Sleep `interval` again and again and tell `metrics` how much later than asked each
    sleep ended (the timer is the measurement, so this poll is the point of it)."""
    metrics.loop_lag(0.0)
    task_status.started()
    while True:
        asked = anyio.current_time() + interval
        await anyio.sleep(interval)
        metrics.loop_lag(max(0.0, anyio.current_time() - asked))
