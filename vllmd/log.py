"""Logging: structlog, JSON for journald and files, readable console output in a terminal."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping, Set
from json.encoder import encode_basestring_ascii
from pathlib import PurePath
from typing import Any, Literal

import structlog

LogFormat = Literal["json", "console"]


def configure(level: str = "info", fmt: LogFormat | None = None) -> None:
    """Set up structlog once, at the CLI edge. `fmt=None` picks console for a TTY."""
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderers: list[structlog.types.Processor] = (
        [as_json_values, structlog.dev.ConsoleRenderer()]
        if fmt == "console"
        else [structlog.processors.JSONRenderer(default=json_default)]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # uvicorn and httpx use stdlib logging; keep their noise out, errors in.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


def json_default(value: object) -> Any:
    """What JSON cannot encode itself: read-only maps as objects, sets as sorted arrays, paths
    as strings; anything else as structlog would (its `__structlog__`, else its repr)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Set):
        return sorted(value, key=str)
    if isinstance(value, PurePath):
        return str(value)
    custom = getattr(value, "__structlog__", None)
    return custom() if callable(custom) else repr(value)


class _Json:
    """A value the console shows as JSON: it prints a value's repr, Python's for a map."""

    __slots__ = ("text",)

    def __init__(self, value: object) -> None:
        self.text = json.dumps(value, default=json_default, ensure_ascii=False)

    def __repr__(self) -> str:
        return self.text


def as_json_values(
    _logger: object, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The console's processor: maps, lists and sets shown as JSON, as the JSON log has them."""
    for key, value in event.items():
        if isinstance(value, Mapping | list | tuple | Set):
            event[key] = _Json(value)
    return event


# The processor chain `configure` sets for JSON, by type: the line `RequestLog` can render.
_JSON_CHAIN: tuple[type, ...] = (
    type(structlog.processors.add_log_level),
    structlog.processors.TimeStamper,
    type(structlog.processors.format_exc_info),
    structlog.processors.JSONRenderer,
)


_LINE = (
    '{"request_id": %s, %s%d, "seconds": %s, '
    '"event": "request", "level": "info", "timestamp": "%s.%06dZ"}'
)


def rounded(seconds: float) -> str:
    """`repr(round(seconds, 4))` for 0 <= seconds < 1e11, for half its cost: both round the
    binary value correctly to four places, and no shorter decimal names the same double."""
    text = ("%.4f" % seconds).rstrip("0")  # noqa: UP031  # % is the fast one here
    return text + "0" if text.endswith(".") else text


FLUSH_AFTER = 0.01  # seconds a request line may wait to be written with others
FLUSH_LINES = 256


class RequestLog:
    """The gateway's one line per request, cheap: under `configure`'s JSON chain (and no
    context bound), the very line structlog would write is formatted here, without building
    an event dict and running five processors, and lines are written together at most
    `FLUSH_AFTER` later (a write and a flush per line were a tenth of the gateway's CPU).
    Under any other set-up (console, tests' capture) it is an ordinary structlog call. The
    set-up is read at the first request (`configure` runs before any)."""

    def __init__(self, logger: structlog.typing.FilteringBoundLogger) -> None:
        self._logger = logger
        self._sink: structlog.PrintLogger | None = None
        self._checked = False
        self._second = -1
        self._stamp = ""
        self._lines: list[str] = []
        self._middles: dict[tuple[str, str], str] = {}
        self._timer: asyncio.TimerHandle | None = None
        # structlog's registry of the context variables ever bound: while it is empty, no
        # context can be bound, and looking (a walk over every variable of the request's
        # context) is skipped. None (another structlog): always look.
        self._bound_vars: dict[str, object] | None = getattr(
            structlog.contextvars, "_CONTEXT_VARS", None
        )

    def flush(self) -> None:
        """Write the lines waiting (the gateway calls it when it closes, too)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines and self._sink is not None:
            lines, self._lines = self._lines, []
            self._sink.msg("\n".join(lines))

    def _fast_sink(self) -> structlog.PrintLogger | None:
        config = structlog.get_config()
        processors = config["processors"]
        factory = config["logger_factory"]
        chain = tuple(type(p) for p in processors[1:]) if processors else ()
        fast = (
            len(processors) == 5
            and processors[0] is structlog.contextvars.merge_contextvars
            and all(issubclass(t, want) for t, want in zip(chain, _JSON_CHAIN, strict=True))
            and isinstance(factory, structlog.PrintLoggerFactory)
            and self._logger.is_enabled_for(logging.INFO)
        )
        return factory() if fast else None

    def request(self, request_id: str, model: str, route: str, status: int, seconds: float) -> None:
        if not self._checked:
            self._sink, self._checked = self._fast_sink(), True
        sink = self._sink
        registry = self._bound_vars
        maybe_bound = registry is None or bool(registry)
        if sink is None or (maybe_bound and structlog.contextvars.get_contextvars()):
            self._logger.info(
                "request",
                request_id=request_id,
                model=model,
                route=route,
                status=status,
                seconds=round(seconds, 4),
            )
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # %-formatting: f-strings with format specs and repr(round(x, 4)) were most of it.
        # Models and routes are a closed set: the text between the id and the status, once.
        middle = self._middles.get((model, route))
        if middle is None:
            middle = f'"model": {encode_basestring_ascii(model)}, "route": "{route}", "status": '
            self._middles[(model, route)] = middle
        self._lines.append(
            _LINE
            % (
                encode_basestring_ascii(request_id),
                middle,
                status,
                rounded(seconds),
                self._stamp,
                (now - second) * 1e6,
            )
        )
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
