"""Forwarding one request to an engine and relaying its answer to the ASGI client.

Knows an engine only as an `Upstream` (its pooled transport) and a model name for labels
and messages: no supervisor, no leases, no queues. The gateway acquires the instance and
watches the client's disconnect; this module moves the bytes.

Bytes are relayed unbuffered when the engine streams (SSE). Otherwise an answer of up to
MAX_BUFFERED bytes is read whole, so it carries an exact `content-length` (the common case);
a larger one is passed through as it arrives (with the engine's `content-length` if it sent
one, else chunked), so the daemon never holds more of it than that. An engine failure becomes
a 502 `engine_unavailable` while no header is sent yet; after that, one final SSE error event
in a stream, and a cut connection in a passed-through answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from vllmd.engine.answers import UpstreamError, UpstreamResponse
from vllmd.engine.api import Upstream
from vllmd.gateway.errors import Code, gateway_error
from vllmd.httpserver.asgi import Send
from vllmd.metrics import Metrics

# Hop-by-hop headers, and those the proxy sets itself: the client's Authorization carries the
# gateway's key, never the engine's; the engine's own key is added by `Upstream`.
REQUEST_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"authorization",
        b"x-request-id",  # set once by the gateway
        b"expect",  # the whole body goes at once: no interim 100 to wait for
    }
)
RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"date",
        b"server",
        b"x-request-id",
    }
)


MAX_BUFFERED = 1024 * 1024  # bytes of a plain answer read whole before it is relayed

# The status to count and the time to first byte (None when no byte came from the engine).
Forwarded = tuple[int, float | None]


class Proxy:
    """Sends a request to an engine's `Upstream` and relays the answer to an ASGI `send`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def forward(
        self,
        send: Send,
        upstream: Upstream,
        route: str,
        body: bytes,
        client_headers: Iterable[tuple[bytes, bytes]],
        *,
        request_id: str,
        model: str,
    ) -> Forwarded:
        """POST `body` to `route` on the engine and relay its answer; returns the status to
        count and the time to first byte (None: no byte came). Raises `HTTPError` (502) when
        the engine fails before any header is sent."""
        headers = [(k, v) for k, v in client_headers if k not in REQUEST_DROP]
        headers.append((b"x-request-id", request_id.encode()))
        sent = time.perf_counter()
        try:
            response = await upstream.post(route, body, headers)
        except UpstreamError as exc:
            raise gateway_error(
                Code.ENGINE_UNAVAILABLE,
                f"the engine of model {model} did not answer ({type(exc).__name__})",
            ) from None
        try:
            return await self.relay(send, response, request_id=request_id, model=model, sent=sent)
        finally:
            await response.aclose()

    async def relay(
        self, send: Send, response: UpstreamResponse, *, request_id: str, model: str, sent: float
    ) -> Forwarded:
        """Relay an engine's `response` (body not read yet) to `send`; `sent` is when the
        request left, for the time to first byte. Returns the status to count (502 when a
        stream broke off, though the client was sent the engine's status) and that time."""
        headers = [(k, v) for k, v in response.headers if k.lower() not in RESPONSE_DROP]
        headers.append((b"x-request-id", request_id.encode()))
        streaming = response.content_type().startswith(b"text/event-stream")
        if not streaming:
            try:
                data, whole = await response.abuffer(MAX_BUFFERED)
            except UpstreamError as exc:  # nothing sent yet: still a proper error answer
                raise gateway_error(
                    Code.ENGINE_UNAVAILABLE,
                    f"the engine of model {model} broke off its answer ({type(exc).__name__})",
                ) from None
            seconds = time.perf_counter() - sent
            self.metrics.first_byte(model, seconds)
            if not whole:
                return await pass_through(send, response, headers, data), seconds
            headers.append((b"content-length", str(len(data)).encode()))
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            await send({"type": "http.response.body", "body": data})
            return response.status_code, seconds
        status: int = response.status_code
        await send({"type": "http.response.start", "status": status, "headers": headers})
        first = True
        ttfb: float | None = None
        last = b""
        try:
            async for chunk in response.aiter_raw():
                if first:
                    ttfb = time.perf_counter() - sent
                    self.metrics.first_byte(model, ttfb)
                    first = False
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last = chunk
        except UpstreamError as exc:
            # Headers are gone already: the error travels as one last SSE event, after the
            # end of any event the engine left half-sent (else the two would merge).
            event = stream_error(last, model, exc)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            status = 502  # what metrics and the log count: the engine failed this request
        await send({"type": "http.response.body", "body": b""})
        return status, ttfb


async def pass_through(
    send: Send, response: UpstreamResponse, headers: list[tuple[bytes, bytes]], first: bytes
) -> int:
    """Relay a plain answer too large to hold, `first` being what was read of it, the rest as
    it arrives. Returns the status to count: 502 when the engine broke off (the answer is
    then left unfinished: the server cuts the connection, so the client cannot take a part
    of it for the whole)."""
    length = next((v for k, v in response.headers if k.lower() == b"content-length"), None)
    if length is not None:
        headers.append((b"content-length", length))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": first, "more_body": True})
    try:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except UpstreamError:
        return 502
    await send({"type": "http.response.body", "body": b""})
    return response.status_code


def stream_error(last: bytes, model: str, exc: Exception) -> bytes:
    """The SSE event that tells a client its stream broke off, `last` being the final chunk
    it was sent."""
    error = {
        "error": {
            "message": f"the engine of model {model} broke off the stream ({type(exc).__name__})",
            "type": "server_error",
            "code": Code.ENGINE_UNAVAILABLE.value,
        }
    }
    return sse_event_end(last) + b"data: " + json.dumps(error).encode() + b"\n\n"


def sse_event_end(sent: bytes) -> bytes:
    """What ends the SSE event whose last bytes were `sent` (b"" when it is complete)."""
    if sent.endswith(b"\n\n") or not sent:
        return b""
    return b"\n" if sent.endswith(b"\n") else b"\n\n"
