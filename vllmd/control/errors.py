"""The control API's closed set of error codes, their statuses, and its one error type."""

from __future__ import annotations

from typing import Any

# The closed set of the control API's error codes and their statuses.
STATUSES = {
    "bad_request": 400,
    "forbidden": 403,
    "model_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "invalid_state": 409,
    "insufficient_memory": 409,
    "body_too_large": 413,
    "config_invalid": 422,
    "start_failed": 502,
    "shutting_down": 503,
    "timeout": 504,
}


class ControlError(Exception):
    """An answer with one of the closed set of codes (`STATUSES`)."""

    def __init__(self, code: str, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        assert code in STATUSES, code
        self.code = code
        self.message = message
        self.extra = extra or {}
