"""A monotonic clock a test can move forward: the daemon's sense of "how long ago" (recent use,
min_residency, idle TTLs, backoff) jumps, while real waits (health checks, timeouts) do not."""

from __future__ import annotations

import time


class SkipClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def skip(self, seconds: float) -> None:
        """Everything that happened so far is now `seconds` further in the past."""
        self.offset += seconds
