"""systemd's notify protocol: READY, STATUS, STOPPING, WATCHDOG, RELOADING.

Without NOTIFY_SOCKET (not under systemd) every call does nothing, so the daemon calls these
unconditionally; a STATUS= line is given as a function, called only when it is sent (it walks
every model, at READY and at every state change: work for nobody outside systemd).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import sdnotify


class Notifier:
    def __init__(self) -> None:
        # sdnotify opens its datagram socket at once, even when there is nobody to tell.
        self._notifier = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None

    def _send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.socket.close()
            self._notifier = None

    def ready(self, status: Callable[[], str]) -> None:
        if self._notifier is not None:
            self._send("READY=1", f"STATUS={status()}")

    def status(self, status: Callable[[], str]) -> None:
        if self._notifier is not None:
            self._send(f"STATUS={status()}")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping: draining requests, stopping engines")

    def extend_timeout(self, seconds: float) -> None:
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def reloading(self) -> None:
        self._send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of systemd's WatchdogSec, when the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000
