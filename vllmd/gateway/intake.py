"""What the gateway reads of a request, cheaply: its id and length from the headers, its
JSON body, and the callback that cancels it when the client leaves. Each is on the path of
every proxied request and is written for it (and tested against the slow path it replaces:
json.loads, asyncio.timeout)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

from vllmd.gateway.errors import Code, gateway_error

# The last two hex digits of an id, for a block of 256 ids made at once.
_LAST_TWO = tuple(f"{i:02x}" for i in reversed(range(256)))


class RequestIds:
    """X-Request-Id for requests that bring none: 32 hex digits like a uuid4's, a random
    prefix per gateway and a counter (os.urandom per request was a syscall each). Made 256
    at a time: formatting a 64-bit counter per request cost more than the rest of the id."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._block = secrets.randbelow(1 << 56)  # the counter's upper 14 hex digits
        self._ready: list[str] = []

    def next(self) -> str:
        if not self._ready:
            self._block = (self._block + 1) & ((1 << 56) - 1)
            head = f"{self._prefix}{self._block:014x}"
            self._ready = [head + last for last in _LAST_TWO]  # popped from the end: 00 first
        return self._ready.pop()


class CancelOnLeave:
    """ON_DISCONNECT's callback for one request: the client left, so the request's task is
    cancelled (as asyncio.timeout does, without its timer and bookkeeping).

    Armed only once the request is about to wait: a call before (the client had left when
    the callback was registered) only marks it, since a cancellation that no await inside
    the request takes would hit the task later. Once armed, every call comes from the loop
    while the task waits inside the request, where the cancellation lands."""

    __slots__ = ("_cancelling", "fired", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.fired = False
        self._cancelling = 0

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self.task = asyncio.current_task(loop)
        if self.task is not None:
            self._cancelling = self.task.cancelling()

    def __call__(self) -> None:
        if not self.fired:
            self.fired = True
            if self.task is not None:
                self.task.cancel()

    def uncancel(self) -> bool:
        """After a CancelledError: True when it was this callback's doing alone (the
        cancellation is then taken back), False when the task was cancelled otherwise."""
        if not self.fired or self.task is None:
            return False
        return self.task.uncancel() <= self._cancelling


# json's own scanner (C), which json.loads reaches through four Python calls.
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def json_object(body: bytes) -> dict[str, Any]:
    if body[:1] == b"{" and body[-1:] == b"}":
        # What clients send: a UTF-8 object, nothing around it. Scanned whole, it is what
        # json.loads would return; anything else (a BOM, UTF-16, an error) goes to it.
        try:
            text = body.decode()
            value, end = _scan_json(text, 0)
        except (ValueError, StopIteration, RecursionError):
            pass
        else:
            if end == len(text):
                return value  # type: ignore[no-any-return]  # an object: it began with {
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # (nested deeper than the parser goes)
        raise gateway_error(Code.INVALID_REQUEST, "the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise gateway_error(Code.INVALID_REQUEST, "the request body must be a JSON object")
    return payload


def body_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise gateway_error(Code.INVALID_REQUEST, "the request body has no `model`")
    return model


def request_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bytes | None]:
    """The client's X-Request-Id and Content-Length, in one pass over its headers."""
    request_id = length = None
    for key, value in headers:
        if key == b"x-request-id" and request_id is None:
            request_id = value.decode("latin-1")
        elif key == b"content-length" and length is None:
            length = value
    return request_id, length
