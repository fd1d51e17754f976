"""The engine's HTTP surface, as vllmd uses it: health, warm-up, sleep/wake, metrics.

One `httpx.AsyncClient` per running engine for vllmd's own calls and one keep-alive pool
(vllmd.engine.upstream) for the gateway's proxying, both made once when the engine is spawned
(no per-request client or connection set-up). httpx is imported then, not at the daemon's
start, which may serve no model for a while (docs/performance.md "Start-up").
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vllmd.config import EngineConfig
from vllmd.engine.answers import (
    UNBOUNDED,
    ConnectError,
    ConnectTimeout,
    ReadError,
    RemoteProtocolError,
    UpstreamError,
    UpstreamResponse,
    buffer,
    content_type,
)
from vllmd.engine.argv import EngineAddress
from vllmd.engine.upstream import Pool
from vllmd.errors import EngineUnavailable

if TYPE_CHECKING:
    import httpx


def make_client(
    address: EngineAddress,
    *,
    connect_timeout: float,
    max_connections: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[httpx.AsyncClient, Upstream]:
    """Two paths to one engine: an httpx client for vllmd's own calls, and an `Upstream` for
    proxying (vllmd.engine.upstream's keep-alive pool; closing the client closes it too). Read
    timeouts are left to each call (streams are long).

    `transport` replaces both (tests pass an `httpx.MockTransport`): the proxy's path then
    goes through it as well, so a test sees every request vllmd would send the engine."""
    import httpx

    upstream: Upstream
    if transport is None:
        pool = Pool(
            uds=address.uds,
            host=address.host,
            port=address.port or 0,
            connect_timeout=connect_timeout,
            auth=f"Bearer {address.api_key}".encode() if address.api_key else b"",
        )
        transport = _closing_transport(
            httpx.AsyncHTTPTransport(
                uds=str(address.uds) if address.uds is not None else None,
                limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=4),
                retries=0,
            ),
            pool,
        )
        upstream = pool
    else:
        upstream = TransportUpstream(transport, address, connect_timeout)
    headers = {"Authorization": f"Bearer {address.api_key}"} if address.api_key else {}
    client = httpx.AsyncClient(
        transport=transport,
        base_url=address.base_url,
        headers=headers,
        timeout=httpx.Timeout(None, connect=connect_timeout),
    )
    return client, upstream


class Upstream(Protocol):
    """The proxy's path to one engine; `reads` counts the reads of its answers (the engine's
    progress, sampled by the liveness check)."""

    @property
    def reads(self) -> int: ...

    def abort(self) -> None:
        """Fail every answer in progress at once (its engine is being restarted)."""
        ...

    async def post(
        self, route: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> UpstreamResponse:
        """Send a POST and return the response with its body still to be read."""
        ...


def _closing_transport(inner: httpx.AsyncBaseTransport, pool: Pool) -> httpx.AsyncBaseTransport:
    """The client's transport, closing the proxy's pool with it (one owner, one close)."""
    import httpx

    class ClosingTransport(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await inner.handle_async_request(request)

        async def aclose(self) -> None:
            pool.close()
            await inner.aclose()

    return ClosingTransport()


def upstream_error(exc: httpx.HTTPError) -> UpstreamError:
    """httpx's error as the upstream pool's (the proxy knows those only)."""
    import httpx

    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectTimeout(str(exc))
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(str(exc))
    if isinstance(exc, httpx.RemoteProtocolError):
        return RemoteProtocolError(str(exc))
    return ReadError(str(exc))


class TransportUpstream:
    """The proxy's path through an injected httpx transport (tests): straight to it, with
    none of what `AsyncClient.send` adds per request; URLs and fixed headers built once."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, address: EngineAddress, connect_timeout: float
    ) -> None:
        self._transport = transport
        self._base = address.base_url
        self._urls: dict[str, httpx.URL] = {}
        self._auth = (
            [(b"authorization", f"Bearer {address.api_key}".encode())] if address.api_key else []
        )
        self._timeout = {"connect": connect_timeout, "read": None, "write": None, "pool": None}
        self.reads = 0

    def abort(self) -> None:
        pass  # the test's transport: its answers end as the test says

    def note_read(self) -> None:
        """One more read of an answer (its `_HttpxResponse` tells)."""
        self.reads += 1

    async def post(
        self, route: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> UpstreamResponse:
        import httpx

        url = self._urls.get(route)
        if url is None:
            url = self._urls[route] = httpx.URL(self._base + route)
        headers = [
            (b"host", b"engine"),
            (b"content-length", str(len(body)).encode()),
            *headers,
            *self._auth,
        ]
        request = httpx.Request(
            "POST", url, headers=headers, content=body, extensions={"timeout": self._timeout}
        )
        try:
            return _HttpxResponse(await self._transport.handle_async_request(request), self)
        except httpx.HTTPError as exc:
            raise upstream_error(exc) from exc


class _HttpxResponse:
    __slots__ = ("_raw", "_response", "_upstream", "headers", "status_code")

    def __init__(self, response: httpx.Response, upstream: TransportUpstream) -> None:
        self._response = response
        self._upstream = upstream
        self._raw: AsyncIterator[bytes] | None = None  # one iterator: abuffer() then the rest
        self.status_code = response.status_code
        self.headers = list(response.headers.raw)

    def content_type(self) -> bytes:
        return content_type(self.headers)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while (chunk := await self._next()) is not None:
            yield chunk

    async def _next(self) -> bytes | None:
        import httpx

        if self._raw is None:
            response = self._response  # (one read already, as a mock's plain answer is, is whole)
            read = response.is_stream_consumed
            self._raw = _once(response.content) if read else response.aiter_raw()
        try:
            chunk = await anext(self._raw)
        except StopAsyncIteration:
            return None
        except httpx.HTTPError as exc:
            raise upstream_error(exc) from exc
        self._upstream.note_read()
        return chunk

    async def aread(self) -> bytes:
        return (await self.abuffer(UNBOUNDED))[0]

    async def abuffer(self, limit: int) -> tuple[bytes, bool]:
        return await buffer(self._next, limit)

    async def aclose(self) -> None:
        await self._response.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


_CLOSE = {"connection": "close"}


class EngineAPI:
    """Calls on one engine's control and probe routes. Probes answer a bool; the others
    raise `EngineUnavailable` (httpx's errors are translated here, and nowhere else)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def _call(self, method: str, path: str, timeout: float, **kwargs: Any) -> httpx.Response:
        """One call whose answer must be a success: anything else is `EngineUnavailable`
        (httpx's RuntimeErrors too: a stream consumed twice, a client closed under it)."""
        import httpx

        try:
            response = await self.client.request(method, path, timeout=timeout, **kwargs)
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise EngineUnavailable(str(exc), refused=True) from exc
        except (httpx.HTTPError, RuntimeError) as exc:
            raise EngineUnavailable(str(exc)) from exc
        return response

    async def healthy(self, timeout: float = 2.0) -> bool:
        """True when GET /health answers 200; refused connections (still starting) are False.
        Each check is on a connection of its own (`connection: close`): a kept one would pass
        while no new one can be made (its socket removed), which the proxy's pool needs."""
        import httpx

        try:
            response = await self.client.get("/health", timeout=timeout, headers=_CLOSE)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def version(self, timeout: float = 2.0) -> str | None:
        """The engine's vLLM version (GET /version); None when it does not say."""
        import httpx

        try:
            response = await self.client.get("/version", timeout=timeout)
            version = response.json().get("version") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError, RecursionError):
            return None
        return version if isinstance(version, str) and version else None

    async def warm_up(self, served_name: str, timeout: float = 120.0) -> str | None:
        """One 1-token inference so the first user request does not pay the engine's first-run
        cost. Generative models take a completion; pooling models refuse it (4xx) and take an
        embedding instead. Returns None when the engine answered, or what failed: a 5xx, a
        timeout (an engine wedged in CUDA-graph capture answers /health but never infers) or a
        broken connection. A model that refuses both tasks (4xx) warmed nothing and failed
        nothing: None."""
        attempts = (
            ("/v1/completions", {"model": served_name, "prompt": "hi", "max_tokens": 1}),
            ("/v1/embeddings", {"model": served_name, "input": "hi"}),
        )
        import httpx

        for path, body in attempts:
            try:
                response = await self.client.post(path, json=body, timeout=timeout)
            except httpx.TimeoutException:
                return f"{path} did not answer within {timeout:g}s"
            except (httpx.HTTPError, RuntimeError) as exc:
                return f"{path} failed: {exc or type(exc).__name__}"
            if response.status_code < 400:
                return None
            if response.status_code >= 500:
                return f"{path} answered {response.status_code}: {response.text[:200]!r}"
        return None

    async def sleep(self, level: int, timeout: float = 120.0) -> None:
        await self._call("POST", "/sleep", timeout, params={"level": level})

    async def is_sleeping(self, timeout: float = 10.0) -> bool:
        response = await self._call("GET", "/is_sleeping", timeout)
        try:
            body = response.json()
        except (ValueError, RecursionError) as exc:  # (nested deeper than the parser goes)
            raise EngineUnavailable(str(exc)) from exc
        if not isinstance(body, dict) or not isinstance(body.get("is_sleeping"), bool):
            raise EngineUnavailable(f"unexpected /is_sleeping answer: {response.text[:100]!r}")
        return bool(body["is_sleeping"])

    async def wake_up(self, level: int, timeout: float = 300.0) -> None:
        """Level 1: weights are in host RAM. Level 2: weights were discarded and are reloaded
        from disk before the KV cache is re-allocated, then the stale prefix cache is reset."""
        if level == 2:
            steps: list[tuple[str, dict[str, object]]] = [
                ("/wake_up", {"params": {"tags": "weights"}}),
                ("/collective_rpc", {"json": {"method": "reload_weights"}}),
                ("/wake_up", {"params": {"tags": "kv_cache"}}),
                ("/reset_prefix_cache", {}),
            ]
        else:
            steps = [("/wake_up", {})]
        for path, kwargs in steps:
            await self._call("POST", path, timeout, **kwargs)

    async def metrics(self, timeout: float = 2.0) -> str:
        return (await self._call("GET", "/metrics", timeout)).text


def new_address(engine: EngineConfig, runtime_dir: Path, name: str) -> EngineAddress:
    """Where a new engine of `name` will listen. uds: a fresh private 0700 directory per start
    (no stale socket; nobody else connects). tcp: a free loopback port and a random key."""
    if engine.transport == "uds":
        directory = runtime_dir / f"{name}-{secrets.token_hex(4)}"
        directory.mkdir(mode=0o700, parents=True)
        return EngineAddress(uds=directory / "engine.sock")
    return EngineAddress.tcp("127.0.0.1", _free_port(*engine.port_range))


def _free_port(low: int, high: int) -> int:
    for port in range(low, high + 1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {low}-{high}")
