"""An engine's output: a bounded ring buffer per model (for `vllmctl logs` and for telling why
an engine exited), each line also sent to the structured log with the model bound."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import structlog

from vllmd.engine.process import EngineProcess

OUTPUT_LINES = 2000


# What vLLM's API server logs just before it serves (vllm/entrypoints/launchers/api_server/
# entry.py, before `serve_http`; "Starting vLLM API server N on ..." in older releases):
# until then /health cannot answer.
SERVING = ("Starting vLLM server on", "Starting vLLM API server")


class EngineOutput:
    def __init__(self, log: structlog.typing.FilteringBoundLogger, lines: int = OUTPUT_LINES):
        self.lines: deque[str] = deque(maxlen=lines)
        self.serving = False  # the current engine said it is about to serve
        self._log = log
        self._seen = 0  # lines ever read
        self._start = 0  # _seen when the current engine was spawned
        self._appended = anyio.Event()  # set (and replaced) on every new line: followers wait
        self._closed: tuple[int, str] | None = None  # (_seen then, the followers' last line)

    def mark_start(self) -> None:
        """A new engine process: `since_start` covers only its lines from now on."""
        self._start = self._seen
        self.serving = False

    def since_start(self, last: int = 50) -> list[str]:
        """Up to `last` of the current engine's most recent lines."""
        count = min(self._seen - self._start, len(self.lines), last)
        return list(self.lines)[len(self.lines) - count :] if count else []

    async def pump(
        self, proc: EngineProcess, done: anyio.Event, serving: Callable[[], None] | None = None
    ) -> None:
        """Read the engine's merged stdout/stderr until it closes; `serving` is called once
        the engine says it is about to serve."""
        async for line in proc.lines():
            was = self.serving
            self.append(line)
            if serving is not None and self.serving and not was:
                serving()
        done.set()

    def append(self, line: str) -> None:
        if not self.serving and "Starting vLLM" in line and any(s in line for s in SERVING):
            self.serving = True
        self.lines.append(line)
        self._seen += 1
        self._log.info("engine_output", line=line)
        appended, self._appended = self._appended, anyio.Event()
        appended.set()

    def close(self, last_line: str) -> None:
        """No more lines for followers (the model is gone): each one, now or later, gets what
        came before this call, then `last_line`, and ends. The ring itself is kept."""
        if self._closed is None:
            self._closed = (self._seen, last_line)
            self._appended.set()  # wake the followers that wait (a set Event stays set)

    def tail(self, n: int) -> tuple[list[str], int]:
        """The last `n` lines kept (fewer when fewer are), and the cursor to `follow` from."""
        return (list(self.lines)[-n:] if n > 0 else []), self._seen

    async def follow(self, cursor: int) -> AsyncIterator[str]:
        """Every line appended after `cursor` (from `tail`), as it comes (`vllmctl logs -f`),
        until `close`: then its last line, and the end. A follower that falls more than the
        ring behind skips what the ring no longer holds."""
        seen = cursor  # lines are numbered from 0 in the order they came
        while True:
            closed = self._closed
            end = self._seen if closed is None else closed[0]
            if seen < end:
                ring = list(self.lines)
                first = self._seen - len(ring)  # the number of the ring's oldest line
                kept = ring[max(seen - first, 0) : end - first]
                seen = end
                for line in kept:
                    yield line
                continue  # more may have come (or a close) while the follower read these
            if closed is not None:
                yield closed[1]
                return
            await self._appended.wait()

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)
