"""The gateway's closed set of error codes, their HTTP statuses, and the one mapping of
vllmd's errors to them (docs/design.md "Gateway").

Every error the gateway answers is OpenAI's shape (`{"error": {"message", "type", "code"}}`,
vllmd.httpserver.asgi.send_error) with one of these codes; every 503 carries Retry-After.
"""

from __future__ import annotations

from enum import StrEnum

from vllmd.errors import InvalidState, ModelNotFound, ModelUnavailable, StartFailed, VllmdError
from vllmd.httpserver.asgi import HTTPError

# A 503 whose cause has no estimate still says when to come back (docs/design.md: every 503).
DEFAULT_RETRY_AFTER = 5.0


class Code(StrEnum):
    INVALID_REQUEST = "invalid_request"  # the body is not a JSON object, or has no `model`
    INVALID_API_KEY = "invalid_api_key"  # api_keys are set and none was presented
    NOT_FOUND = "not_found"  # no such route
    MODEL_NOT_FOUND = "model_not_found"  # no model has that name or alias
    REQUEST_TIMEOUT = "request_timeout"  # the body stalled past gateway.client_body_timeout
    BODY_TOO_LARGE = "body_too_large"  # over gateway.max_body
    INVALID_STATE = "invalid_state"  # the model's state did not allow it (a bug if seen)
    INTERNAL_ERROR = "internal_error"  # a vllmd error that has no code of its own here
    START_FAILED = "start_failed"  # the engine exited or timed out while starting
    ENGINE_UNAVAILABLE = "engine_unavailable"  # the engine failed the request it was sent
    MODEL_UNAVAILABLE = "model_unavailable"  # 503s, each with Retry-After:
    MODEL_FAILED = "model_failed"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    MODEL_UNLOADED = "model_unloaded"  # unloaded by an operator while the request waited
    SHUTTING_DOWN = "shutting_down"


_BY_VALUE = {code.value: code for code in Code}
STATUSES: dict[Code, int] = {
    Code.INVALID_REQUEST: 400,
    Code.INVALID_API_KEY: 401,
    Code.NOT_FOUND: 404,
    Code.MODEL_NOT_FOUND: 404,
    Code.REQUEST_TIMEOUT: 408,
    Code.BODY_TOO_LARGE: 413,
    Code.INVALID_STATE: 500,
    Code.INTERNAL_ERROR: 500,
    Code.START_FAILED: 502,
    Code.ENGINE_UNAVAILABLE: 502,
    Code.MODEL_UNAVAILABLE: 503,
    Code.MODEL_FAILED: 503,
    Code.INSUFFICIENT_MEMORY: 503,
    Code.QUEUE_FULL: 503,
    Code.QUEUE_TIMEOUT: 503,
    Code.MODEL_UNLOADED: 503,
    Code.SHUTTING_DOWN: 503,
}

# `vllmd_requests_rejected_total{reason}`: the codes of requests refused before an engine
# saw them, for want of room or time (docs/design.md "Metrics").
REJECT_REASONS = frozenset(
    {Code.QUEUE_FULL, Code.QUEUE_TIMEOUT, Code.MODEL_FAILED, Code.INSUFFICIENT_MEMORY}
)


def gateway_error(code: Code, message: str, retry_after: float | None = None) -> HTTPError:
    """The answer for `code`, with its status."""
    status = STATUSES[code]
    if status == 503 and retry_after is None:
        retry_after = DEFAULT_RETRY_AFTER
    return HTTPError(status, code, message, retry_after)


def http_error(exc: VllmdError) -> HTTPError:
    """The gateway's answer to one of vllmd's errors: the one place this mapping lives."""
    message = str(exc)
    if isinstance(exc, ModelNotFound):
        return gateway_error(Code.MODEL_NOT_FOUND, message)
    if isinstance(exc, ModelUnavailable):
        code = _BY_VALUE.get(exc.code, Code.MODEL_UNAVAILABLE)
        return gateway_error(code, message, exc.retry_after)
    if isinstance(exc, StartFailed):
        return gateway_error(Code.START_FAILED, message)
    if isinstance(exc, InvalidState):
        return gateway_error(Code.INVALID_STATE, message)
    return gateway_error(Code.INTERNAL_ERROR, message)
