"""vllmd's one exception hierarchy.

    VllmdError
    ├── ConfigError            a config file or value is invalid (names the key path)
    ├── ModelNotFound          no configured model has that name or alias
    ├── InvalidState           the model's state does not allow the action
    ├── ModelUnavailable       a model cannot take requests now (gateway: 503 + Retry-After)
    │   ├── ModelFailed        the model is `failed` (too many restarts; Retry-After 60 s)
    │   ├── InsufficientMemory the model does not fit and nothing can be evicted for it
    │   ├── QueueFull          the model's (or the host's) request queue is full
    │   ├── QueueTimeout       the request waited `queue_timeout` for the model
    │   └── ShuttingDown       the daemon is stopping and starts nothing more
    ├── StartFailed            the engine exited or timed out while starting
    ├── DeviceError            a device probe failed (no driver, timeout)
    └── ListenFailed           a listening socket could not be bound

Lower-level errors (OSError, httpx errors, NVML errors) are translated into these at exactly
one boundary each; the gateway and the CLI map them to HTTP bodies and exit codes once.
"""

from __future__ import annotations


class VllmdError(Exception):
    """Base of every error vllmd raises on purpose."""

    code = "internal_error"


class ConfigError(VllmdError):
    """A config is invalid; `problems` holds one line per problem, each naming the key path."""

    code = "config_invalid"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelNotFound(VllmdError):
    code = "model_not_found"


class InvalidState(VllmdError):
    code = "invalid_state"


class ModelUnavailable(VllmdError):
    """The model cannot serve now; `retry_after` is seconds, when an estimate is known."""

    code = "model_unavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelFailed(ModelUnavailable):
    """Only an operator gets a failed model going again (`vllmctl load`): clients are told to
    come back in a minute rather than hammer it."""

    code = "model_failed"

    def __init__(self, message: str, retry_after: float | None = 60.0) -> None:
        super().__init__(message, retry_after)


class InsufficientMemory(ModelUnavailable):
    code = "insufficient_memory"


class QueueFull(ModelUnavailable):
    code = "queue_full"


class QueueTimeout(ModelUnavailable):
    code = "queue_timeout"


class ShuttingDown(ModelUnavailable):
    code = "shutting_down"

    def __init__(
        self, message: str = "vllmd is shutting down", retry_after: float | None = 5.0
    ) -> None:
        super().__init__(message, retry_after)


class StartFailed(VllmdError):
    code = "start_failed"


class DeviceError(VllmdError):
    code = "device_error"


class ListenFailed(VllmdError):
    """A listening socket could not be bound (address in use, not permitted, no such host)."""

    code = "listen_failed"


def failure(model: str, error: str | None, *, failed: bool) -> ModelFailed | StartFailed:
    """What a client is told when `model` could not be made ready: `failed` (its restarts
    used up: only an operator gets it going again) or this start failed. The one wording."""
    if failed:
        return ModelFailed(f"model {model} failed: {error}; `vllmctl load {model}` to try again")
    return StartFailed(f"{error}; see `vllmctl logs {model}`")
