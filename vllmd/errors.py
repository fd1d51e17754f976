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
    │   ├── ModelUnloaded      unloaded by an operator while the request waited for it
    │   └── ShuttingDown       the daemon is stopping and starts nothing more
    ├── StartFailed            the engine exited or timed out while starting
    ├── EngineUnavailable      an engine's own route (sleep, wake, metrics) failed or
    │                          answered what vLLM never answers
    ├── Interrupted            a load was overtaken by a stop on purpose (queued again;
    │                          never reaches a client; placement/tickets.py, its only user)
    ├── DeviceError            a device probe failed (no driver, timeout)
    │   └── NvmlUnavailable    NVML cannot be used here (no pynvml, library or driver)
    └── ListenFailed           a listening socket could not be bound

Lower-level errors (OSError, httpx errors, NVML errors) are translated into these at exactly
one boundary each: engine/api.py for the engine's routes, devices/nvml.py for NVML. The
gateway maps them to HTTP once (gateway/errors.py), the control API to its codes once
(control/errors.py), the CLI to exit codes once (cli/vllmd.py).

Two error types live beside the code they belong to, outside this tree because they never
leave it: `UpstreamError` (engine/upstream.py: the proxy's connection to an engine broke,
answered as the gateway's 502 `engine_unavailable`) and `IllegalTransition`
(instance/states.py: a bug, not a condition).
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


class ModelUnloaded(ModelUnavailable):
    """An operator unloaded the model while the request waited for its start: nothing is
    wrong with it, and a request a moment later starts it again."""

    code = "model_unloaded"

    def __init__(self, message: str, retry_after: float | None = 5.0) -> None:
        super().__init__(message, retry_after)


class ShuttingDown(ModelUnavailable):
    code = "shutting_down"

    def __init__(
        self, message: str = "vllmd is shutting down", retry_after: float | None = 5.0
    ) -> None:
        super().__init__(message, retry_after)


class StartFailed(VllmdError):
    code = "start_failed"


class EngineUnavailable(VllmdError):
    """One of the engine's own routes did not answer, answered an error status, or answered
    something vLLM does not (`refused`: an HTTP error status; `unreachable`: no answer)."""

    code = "engine_unavailable"

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class DeviceError(VllmdError):
    code = "device_error"


class NvmlUnavailable(DeviceError):
    """NVML cannot be used on this host: pynvml, libnvidia-ml or the driver is missing."""


class ListenFailed(VllmdError):
    """A listening socket could not be bound (address in use, not permitted, no such host)."""

    code = "listen_failed"


def failure(model: str, error: str | None, *, failed: bool) -> ModelFailed | StartFailed:
    """What a client is told when `model` could not be made ready: `failed` (its restarts
    used up: only an operator gets it going again) or this start failed. The one wording."""
    if failed:
        return ModelFailed(f"model {model} failed: {error}; `vllmctl load {model}` to try again")
    return StartFailed(f"{error}; see `vllmctl logs {model}`")
