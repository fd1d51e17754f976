"""The kernel's log, read for one thing: which processes the OOM killer killed.

An engine killed by SIGKILL may have been OOM-killed or killed by someone else; the kernel
says which, naming the victim's pid:

    Out of memory: Killed process 1234 (python3) total-vm:... oom_score_adj:500
    Memory cgroup out of memory: Killed process 1234 (python3) ...
    oom-kill:constraint=CONSTRAINT_NONE,...,task_memcg=/system.slice/vllmd.service,task=python3,pid=1234,uid=990

A counter such as the cgroup's `memory.events` `oom_kill` cannot tell engines apart (nor an
engine from any other process of the unit), so the record is what attributes a kill.

Reading /dev/kmsg needs CAP_SYSLOG where `kernel.dmesg_restrict` is 1: without it nothing can
be attributed, and a SIGKILL stays a plain crash.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog

KMSG = "/dev/kmsg"
RECORD_MAX = 8192  # /dev/kmsg returns one record per read; a smaller buffer is EINVAL

log = structlog.get_logger("vllmd.kernel_log")
_VICTIM = re.compile(r"Killed process (\d+)|^oom-kill:.*[,:]pid=(\d+)")


class KernelLog(Protocol):
    """Kernel log messages recorded since the reader was opened (the seam tests replace)."""

    def read(self) -> list[str]:
        """Messages not read yet, oldest first; never blocks."""
        ...

    def close(self) -> None: ...


KernelLogOpener = Callable[[], KernelLog]
_SAID_UNREADABLE: set[str] = set()  # a log line's dedupe, not state anything depends on


def oom_victims(messages: Iterable[str]) -> set[int]:
    """Pids that the kernel's OOM killer says it killed."""
    victims: set[int] = set()
    for message in messages:
        for match in _VICTIM.finditer(message):
            victims.add(int(match.group(1) or match.group(2)))
    return victims


class Kmsg:
    """/dev/kmsg from the moment it was opened. Unreadable (no permission, no such device):
    reads nothing."""

    def __init__(self, path: str = KMSG) -> None:
        self._fd: int | None = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            # Said once per daemon at warning level: without it every OOM kill is a "crash".
            level = "debug" if path in _SAID_UNREADABLE else "warning"
            _SAID_UNREADABLE.add(path)
            log.log(
                getattr(logging, level.upper()),
                "kernel_log_unreadable",
                path=path,
                error=exc.strerror or str(exc),
                consequence="OOM kills of engines are reported as crashes",
                fix="CAP_SYSLOG (AmbientCapabilities=) and ProtectKernelLogs=no in the unit",
            )
            return
        try:
            os.lseek(fd, 0, os.SEEK_END)  # only what happens from now on
        except OSError:
            os.close(fd)
            return
        self._fd = fd

    def read(self) -> list[str]:
        messages: list[str] = []
        while self._fd is not None:
            try:
                record = os.read(self._fd, RECORD_MAX)
            except BrokenPipeError:
                continue  # older records were overwritten before we read them; go on
            except OSError:  # EAGAIN: nothing more for now
                break
            if not record:
                break
            # "PRIORITY,SEQUENCE,MICROSECONDS,FLAGS;message\n KEY=value\n..."
            _, _, text = record.decode("utf-8", "replace").partition(";")
            messages.append(text.split("\n", 1)[0])
        return messages

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
