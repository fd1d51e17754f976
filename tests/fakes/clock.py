"""A clock a test can move forward: the daemon's sense of "how long ago" (recent use,
min_residency, idle TTLs, backoff) jumps, while real waits (health checks, timeouts) do not.
Monotonic by default; `SkipClock(time.time)` for a part that keeps unix time (the store)."""

from __future__ import annotations

import time
from collections.abc import Callable


class SkipClock:
    def __init__(self, base: Callable[[], float] = time.monotonic) -> None:
        self.offset = 0.0
        self._base = base

    def __call__(self) -> float:
        return self._base() + self.offset

    def skip(self, seconds: float) -> None:
        """Everything that happened so far is now `seconds` further in the past."""
        self.offset += seconds
