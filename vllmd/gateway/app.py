"""The OpenAI-compatible gateway: a plain ASGI app, served by vllmd.httpserver.server.

It only asks and forwards: the model named by the request is resolved, a ready instance is
leased from the supervisor (which starts it if needed), and `vllmd.gateway.proxy` moves the
bytes to and from the engine over its pooled transport. While a request is queued or
streaming, the client's disconnect is watched: it cancels the wait or the upstream request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import cast

import structlog

from vllmd.alerts.signals import Observations
from vllmd.config import Config
from vllmd.context import Context
from vllmd.errors import ModelNotFound, ShuttingDown, VllmdError
from vllmd.gateway.errors import REJECT_REASONS, Code, gateway_error, http_error
from vllmd.gateway.intake import (
    CancelOnLeave,
    RequestIds,
    body_model,
    json_object,
    request_headers,
)
from vllmd.gateway.proxy import Forwarded, Proxy
from vllmd.gateway.routes import OTHER
from vllmd.gateway.routes import match as match_route
from vllmd.httpserver.asgi import (
    HTTPError,
    Receive,
    ReceiveWithin,
    Scope,
    Send,
    send_bytes,
    send_error,
    send_json,
)
from vllmd.httpserver.exchange import NO_EXTENSIONS, ON_DISCONNECT, RECEIVE_TIMEOUT
from vllmd.instance.instance import Instance
from vllmd.log import RequestLog
from vllmd.metrics import Metrics
from vllmd.metrics import relay as engines_metrics
from vllmd.supervisor.commands import Supervisor
from vllmd.supervisor.views import model_view

log = structlog.get_logger("vllmd.gateway")

# Recorded (never sent) when the client left first, as nginx does.
CLIENT_CLOSED = 499
GONE: Forwarded = (CLIENT_CLOSED, None)
FAILED: Forwarded = (500, None)  # an exception that is no answer: the server's own 500


class ClientGone(Exception):
    """The client disconnected before its request was read."""


class Gateway:
    def __init__(
        self,
        ctx: Context,
        supervisor: Supervisor,
        metrics: Metrics,
        observations: Observations | None = None,
    ) -> None:
        self._ctx = ctx
        self.supervisor = supervisor
        self.metrics = metrics
        self._observations = observations  # the alerts' error-ratio and latency windows
        self.proxy = Proxy(metrics)
        self._log = RequestLog(log)
        self._ids = RequestIds()
        self.started = int(time.time())
        self._config: Config | None = None  # what the settings below were read from
        self._keys: tuple[bytes, ...] = ()
        self._max_body = 0
        self._body_timeout = 0.0
        self._settings()
        self.accepting = False  # from open() (the daemon serves) until close() (shutdown)
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        self.accepting = True
        # The loop, once: asyncio.get_running_loop() (and current_task() without a loop) is
        # a getpid() system call per call on Python 3.11.
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        self.accepting = False
        self._log.flush()

    def _settings(self) -> Config:
        """The config in force, with what requests need of it prepared once per config."""
        config = self._ctx.config
        if config is not self._config:
            self._config = config
            self._keys = tuple(k.encode() for k in config.gateway.api_keys)
            self._max_body = config.gateway.max_body
            self._body_timeout = config.gateway.client_body_timeout
        return config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if method == "POST":
                # Only the model routes are forwarded, and only under their template: see
                # vllmd.gateway.routes for why a path near one (`..`, `%2F`, `//`) matches nothing.
                hit = match_route(path, scope.get("raw_path"))
                if hit is not None:
                    if self._ctx.config is not self._config:
                        self._settings()  # keys and limits read once per config
                    if self._keys:
                        self._authorize(scope)
                    await self._proxy(scope, receive, send, hit[0], hit[1])
                    return
            elif (method == "GET" or method == "HEAD") and await self._get(scope, send, path):
                # (HEAD: the server sends the head of GET's answer, content-length included)
                return
            await self._no_route(send, method, path)
        except HTTPError as exc:
            await send_error(send, exc)

    async def _no_route(self, send: Send, method: str, path: str) -> None:
        started = time.perf_counter()
        shown = path if len(path) <= 100 else path[:100] + "..."
        await send_error(send, gateway_error(Code.NOT_FOUND, f"no route {method} {shown}"))
        # One series for every path that matches nothing, however many a scanner tries.
        self.metrics.request("", OTHER, 404, time.perf_counter() - started)

    # --- GET routes ------------------------------------------------------------------------

    async def _get(self, scope: Scope, send: Send, path: str) -> bool:
        """Answer one of the gateway's own GET routes; False when `path` is none of them."""
        if path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/ready":
            devices = self.supervisor.devices().values()
            usable = sorted(d.name for d in devices if d.up)
            ready = self.accepting and bool(usable)
            await send_json(send, 200 if ready else 503, {"ready": ready, "devices_up": usable})
        elif path == "/metrics" and not self._settings().metrics.listen:
            # With [metrics] listen set, Prometheus is served on its own listener only.
            body, content_type = self.metrics.exposition()
            await send_bytes(send, 200, body, content_type)
        elif path == "/metrics/engines" and not self._settings().metrics.listen:
            body = await engines_metrics.relay(self.supervisor.instances.values())
            await send_bytes(send, 200, body, engines_metrics.CONTENT_TYPE)
        elif path == "/v1/models":
            self._authorize(scope)
            data = [model_view(st, self.started) for st in self.supervisor.statuses()]
            await send_json(send, 200, {"object": "list", "data": data})
        elif path.startswith("/v1/models/"):
            self._authorize(scope)
            name = path[len("/v1/models/") :]
            try:
                instance = self.supervisor.get(name)
            except ModelNotFound as exc:
                raise http_error(exc) from None
            view = model_view(self.supervisor.status(instance), self.started)
            await send_json(send, 200, view)
        else:
            return False
        return True

    def _authorize(self, scope: Scope) -> None:
        self._settings()
        if not self._keys:
            return
        for key, value in scope["headers"]:
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
                if any(hmac.compare_digest(token, k) for k in self._keys):
                    return
        self.metrics.rejected("", "unauthorized")
        raise gateway_error(Code.INVALID_API_KEY, "Incorrect or missing API key.")

    # --- proxying ---------------------------------------------------------------------------

    async def _proxy(
        self, scope: Scope, receive: Receive, send: Send, route: str, path_model: str | None
    ) -> None:
        started = time.perf_counter()
        request_id, length = request_headers(scope["headers"])
        if request_id is None:
            request_id = self._ids.next()
        model_label = ""
        outcome = FAILED  # until the request is answered, refused or left
        extensions = scope.get("extensions", NO_EXTENSIONS)
        try:
            body = await self._read_body(receive, length, RECEIVE_TIMEOUT in extensions)
            payload = json_object(body)
            name = path_model if path_model is not None else body_model(payload)
            try:
                instance = self.supervisor.get(name)
            except ModelNotFound as exc:
                raise http_error(exc) from None
            model_label = instance.name
            engine_names = instance.engine_names
            if (path_model is not None and payload.get("model") != instance.name) or (
                engine_names and name not in engine_names
            ):
                # The path names the model (the engine serves it under every name anyway),
                # or an alias added by a reload that the running engine was not told of.
                payload["model"] = instance.name
                body = json.dumps(payload).encode()
            if not self.accepting:
                raise http_error(ShuttingDown())
            # From here the client may leave: its disconnect cancels the queue wait or the
            # upstream request (which makes vLLM abort the generation). vllmd's server calls
            # back when the client leaves (ON_DISCONNECT) and the callback cancels this task:
            # a task group, a cancel scope or an asyncio.timeout per request would each cost
            # more than the rest of the gateway's own work (docs/performance.md). Under a
            # server without that extension the request is forwarded unwatched.
            outcome = GONE  # a request cancelled or never sent: the client left
            watch = extensions.get(ON_DISCONNECT)
            if watch is None:
                outcome = await self._forward(scope, send, route, body, instance, request_id)
            else:
                left = CancelOnLeave()
                watch(left)  # calls back at once if the client has left already
                try:
                    if not left.fired:  # (else it left already: nothing is forwarded)
                        left.arm(self._loop or asyncio.get_running_loop())
                        outcome = await self._forward(
                            scope, send, route, body, instance, request_id
                        )
                except asyncio.CancelledError:
                    if not left.uncancel():
                        raise  # (also) cancelled by someone else: the server's shutdown
                finally:
                    watch(None)
        except ClientGone:
            outcome = GONE
        except HTTPError as exc:
            outcome = (exc.status, None)
            exc_headers = [(b"x-request-id", request_id.encode())]
            await send_error(send, exc, exc_headers)
        finally:
            status, ttfb = outcome
            seconds = time.perf_counter() - started
            self.metrics.request(model_label, route, status, seconds)
            if model_label and self._observations is not None:
                self._observations.request(model_label, status, ttfb, self._ctx.clock())
            self._log.request(request_id, model_label, route, status, seconds)

    async def _read_body(self, receive: Receive, length: bytes | None, timed: bool) -> bytes:
        """The whole body. Under vllmd's server (`timed`) each wait for more of it is bounded
        by `client_body_timeout`, so a client that stops sending gives its connection up (the
        answer to a body not all in closes it); elsewhere it is read without a deadline."""
        if length is not None and length.isdigit() and int(length) > self._max_body:
            self.metrics.rejected("", Code.BODY_TOO_LARGE)
            raise gateway_error(Code.BODY_TOO_LARGE, f"request body over {self._max_body} bytes")
        within = cast(ReceiveWithin, receive) if timed else None
        timeout = self._body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await (receive() if within is None else within(timeout))
            except TimeoutError:
                self.metrics.rejected("", Code.REQUEST_TIMEOUT)
                raise gateway_error(
                    Code.REQUEST_TIMEOUT, f"no more of the request body came for {timeout:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                self.metrics.rejected("", Code.BODY_TOO_LARGE)
                raise gateway_error(
                    Code.BODY_TOO_LARGE, f"request body over {self._max_body} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        route: str,
        body: bytes,
        instance: Instance,
        request_id: str,
    ) -> Forwarded:
        try:
            queued = time.perf_counter()
            await self.supervisor.acquire(instance)
            try:
                self.metrics.queued(instance.name, time.perf_counter() - queued)
                upstream = instance.upstream
                assert upstream is not None
                return await self.proxy.forward(
                    send,
                    upstream,
                    route,
                    body,
                    scope["headers"],
                    request_id=request_id,
                    model=instance.name,
                )
            finally:
                self.supervisor.release(instance)
        except VllmdError as exc:
            if exc.code in REJECT_REASONS:
                self.metrics.rejected(instance.name, exc.code)
            raise http_error(exc) from None
