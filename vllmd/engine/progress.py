"""Whether an engine made progress between two liveness checks, for an engine whose /health
does not answer while requests wait on it: busy, or wedged?

Progress is reads on the connections of its answers (tokens flowing: the proxy's pool counts
them) or CPU time used by its processes (an engine computing a long plain answer sends
nothing until the end; on a CPU host vLLM's API server is starved meanwhile, so /health
answers late). A wedged engine (SIGSTOPped, its event loop blocked) shows neither. The CPU
time is read from /proc through psutil in a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import anyio

# CPU seconds per second between two samples that count as progress: a computing engine uses
# a core or more, an idle or stopped one next to nothing.
PROGRESS_CPU = 0.05
# The longest a failing /health is excused by progress: past it the checks count whatever the
# CPU says (vLLM's workers may spin while its API server is stuck). The OpenAI SDK gives up a
# request after 600 s by default: no answer its client still waits for takes longer.
BUSY_GRACE = 600.0
SAME_PROCESS = 0.01  # seconds of start-time difference within which a pid is the same process


class Progress:
    """Samples an engine's progress: `reads()` counts the reads of its answers, `pids()` maps
    its processes (pid -> start time, psutil's create_time) as known."""

    def __init__(self, reads: Callable[[], int], pids: Callable[[], Mapping[int, float]]) -> None:
        self._reads = reads
        self._pids = pids
        self._last_reads = reads()
        self._cpu: dict[int, float] | None = None
        self._at = 0.0

    async def sample(self) -> bool:
        """Whether the engine made progress since the previous sample (False at the first:
        nothing to compare with)."""
        reads = self._reads()
        cpu = await anyio.to_thread.run_sync(cpu_seconds, dict(self._pids()))
        now = anyio.current_time()
        moved = reads != self._last_reads
        if not moved and self._cpu is not None:
            before = self._cpu
            used = sum(cpu[pid] - before[pid] for pid in cpu.keys() & before.keys())
            moved = used >= PROGRESS_CPU * (now - self._at)
        self._last_reads, self._cpu, self._at = reads, cpu, now
        return moved


def cpu_seconds(pids: Mapping[int, float]) -> dict[int, float]:
    """User and system CPU seconds of each process still alive with the same start time."""
    import psutil

    used: dict[int, float] = {}
    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) <= SAME_PROCESS:
                times = proc.cpu_times()
                used[pid] = times.user + times.system
    return used
