"""What vllmd's HTTP surfaces share: the ASGI types, sending bodies, and errors in OpenAI's
shape (each surface has its own closed set of codes: vllmd.gateway.errors)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
# vllmd's server's receive, called with a timeout (its RECEIVE_TIMEOUT extension).
ReceiveWithin = Callable[[float], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
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
