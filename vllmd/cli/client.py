"""vllmctl's client of the control API: which socket it talks to, the calls, and the one
boundary where httpx's errors become vllmctl's (`CtlError`; `Unreachable` for exit 3)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C during a call that is not a follow: the shell's convention
DEFAULT_SOCKET = Path("/run/vllmd/control.sock")
CONNECT_TIMEOUT = 5.0
# Readers answer at once; verbs and streams take as long as the server allows (it bounds waits).
READ_TIMEOUT = httpx.Timeout(60.0, connect=CONNECT_TIMEOUT)
LONG_TIMEOUT = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
STOPPING = "is it stopping? see `systemctl status vllmd`"


class CtlError(Exception):
    """Why a command did not do what was asked. `body` is the API's answer, if there was one."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, body: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.body = body


class Unreachable(CtlError):
    """Nobody answers on the control socket (missing, refused, not permitted)."""

    exit_code = EXIT_UNREACHABLE


class Control:
    """A client of the control API at `socket`; `transport` replaces the Unix socket (tests)."""

    def __init__(self, socket: Path, transport: httpx.BaseTransport | None = None) -> None:
        self.socket = socket
        self._client = httpx.Client(
            transport=transport or httpx.HTTPTransport(uds=str(socket)),
            base_url="http://vllmd",
            timeout=READ_TIMEOUT,
        )

    def close(self) -> None:
        self._client.close()

    def get(self, path: str, params: Mapping[str, str] | None = None) -> httpx.Response:
        with self._errors():
            return _checked(self._client.get(path, params=params))

    def post(self, path: str, params: Mapping[str, str] | None = None) -> httpx.Response:
        with self._errors():
            return _checked(self._client.post(path, params=params, timeout=LONG_TIMEOUT))

    @contextmanager
    def stream(self, path: str, params: Mapping[str, str]) -> Iterator[Iterator[str]]:
        """The lines of an NDJSON stream, as they come, until the server ends it."""
        with (
            self._errors(),
            self._client.stream("GET", path, params=params, timeout=LONG_TIMEOUT) as response,
        ):
            if response.is_error:
                response.read()
                _checked(response)
            yield response.iter_lines()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The one boundary where httpx's errors become vllmctl's."""
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Unreachable(unreachable_message(self.socket, exc)) from exc
        except httpx.RemoteProtocolError as exc:
            # What a follower sees when the daemon stops: its streams end without a last chunk.
            raise CtlError(
                f"vllmd at {self.socket} closed the connection before the answer ended ({STOPPING})"
            ) from exc
        except httpx.TransportError as exc:
            raise CtlError(f"the connection to vllmd at {self.socket} failed: {exc}") from exc


def unreachable_message(socket: Path, exc: BaseException) -> str:
    cause = _os_error(exc)
    if isinstance(cause, FileNotFoundError):
        why = "no such socket"
    elif isinstance(cause, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(cause, PermissionError):
        return (
            f"cannot reach vllmd at {socket}: permission denied (join the socket's group, "
            "daemon.control_socket_group, or run as root)"
        )
    else:
        why = str(exc) or type(exc).__name__
    return f"cannot reach vllmd at {socket}: {why}; is it running? see `systemctl status vllmd`"


def _os_error(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 10:  # httpx -> httpcore -> OSError
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]}"
    raise CtlError(message, body=response.text)


def chosen_socket(flag: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The socket the operator named: `--socket`, else $VLLMD_SOCKET; None if neither."""
    if flag is not None:
        return Path(flag)
    named = environ.get("VLLMD_SOCKET")
    return Path(named) if named else None


def socket_for(flag: Path | None, environ: Mapping[str, str], configured: Path | None) -> Path:
    """The one rule for every verb: `--socket`, else $VLLMD_SOCKET, else the socket of the
    config file in hand (`doctor --config`, or the default config doctor reads), else the
    default."""
    return chosen_socket(flag, environ) or configured or DEFAULT_SOCKET
