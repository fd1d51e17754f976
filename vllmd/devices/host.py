"""The host's RAM and CPU use, read from the kernel directly.

What psutil would report (the same sources, the same arithmetic), without importing it: the
daemon reads these at start, and psutil's import is a share of a start-up that needs it
only once an engine runs (process trees, RSS).
"""

from __future__ import annotations

import os
from pathlib import Path

_STAT = Path("/proc/stat")
_MEMINFO = Path("/proc/meminfo")


def host_memory_total(meminfo: Path = _MEMINFO) -> int:
    """Bytes of RAM: MemTotal from /proc/meminfo, as psutil reads it (in a container whose
    /proc/meminfo is virtualised, as lxcfs does, that is the container's RAM, which
    sysconf's page count is not); sysconf's count where the file cannot be read."""
    try:
        with meminfo.open("rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class CpuUse:
    """The host's CPU use between two readings, as a fraction (psutil's `cpu_percent(None)`
    / 100, rounded as it rounds): the first reading has nothing to compare with."""

    def __init__(self, stat: Path = _STAT) -> None:
        self._stat = stat
        self._last: list[int] | None = None

    def read(self) -> float | None:
        """Use since the previous reading; None at the first one. Blocking: reads /proc."""
        with self._stat.open("rb") as f:
            # user nice system idle iowait irq softirq steal guest guest_nice (ticks)
            now = [int(x) for x in f.readline().split()[1:11]]
        last, self._last = self._last, now
        if last is None:
            return None
        delta = [max(0, b - a) for a, b in zip(last, now, strict=False)]
        total = sum(delta[:8])  # guest and guest_nice are already inside user and nice
        busy = total - delta[3] - (delta[4] if len(delta) > 4 else 0)  # less idle, iowait
        return round(busy / total * 100, 1) / 100 if total else 0.0
