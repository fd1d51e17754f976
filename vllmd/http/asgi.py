"""What vllmd's HTTP surfaces share: sending bodies and OpenAI-shaped errors, and the one
mapping of vllmd's errors to HTTP statuses."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vllmd.errors import ModelNotFound, ModelUnavailable, StartFailed, VllmdError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A 503 whose cause has no estimate still says when to come back (DESIGN: every 503).
DEFAULT_RETRY_AFTER = 5.0
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    405: "invalid_request_error",
}


class HTTPError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def http_error(exc: VllmdError) -> HTTPError:
    """The gateway's answer to one of vllmd's errors: the one place this mapping lives."""
    message = str(exc)
    if isinstance(exc, ModelNotFound):
        return HTTPError(404, exc.code, message)
    if isinstance(exc, ModelUnavailable):
        retry_after = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER
        return HTTPError(503, exc.code, message, retry_after)
    if isinstance(exc, StartFailed):
        return HTTPError(502, exc.code, message)
    return HTTPError(500, exc.code, message)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, payload: object, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_bytes(send, status, json.dumps(payload).encode(), "application/json", extra)


async def send_error(
    send: Send, exc: HTTPError, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = list(extra or [])
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    body = {
        "error": {
            "message": exc.message,
            "type": ERROR_TYPES.get(exc.status, "server_error"),
            "code": exc.code,
        }
    }
    await send_json(send, exc.status, body, headers)
