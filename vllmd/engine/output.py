"""An engine's output: a bounded ring buffer per model (for `vllmctl logs` and for telling why
an engine exited), each line also sent to the structured log with the model bound."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import anyio
import structlog

from vllmd.engine.process import EngineProcess

OUTPUT_LINES = 2000


class EngineOutput:
    def __init__(self, log: structlog.typing.FilteringBoundLogger, lines: int = OUTPUT_LINES):
        self.lines: deque[str] = deque(maxlen=lines)
        self._log = log
        self._seen = 0  # lines ever read
        self._start = 0  # _seen when the current engine was spawned

    def mark_start(self) -> None:
        """A new engine process: `since_start` covers only its lines from now on."""
        self._start = self._seen

    def since_start(self, last: int = 50) -> list[str]:
        """Up to `last` of the current engine's most recent lines."""
        count = min(self._seen - self._start, len(self.lines), last)
        return list(self.lines)[len(self.lines) - count :] if count else []

    async def pump(self, proc: EngineProcess, done: anyio.Event) -> None:
        """Read the engine's merged stdout/stderr until it closes."""
        async for line in proc.lines():
            self.append(line)
        done.set()

    def append(self, line: str) -> None:
        self.lines.append(line)
        self._seen += 1
        self._log.info("engine_output", line=line)

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)
