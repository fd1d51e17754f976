"""The separate Prometheus listener (`[metrics] listen`): `GET /metrics` (vllmd's own) and
`GET /metrics/engines` (the engines', relayed), nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vllmd.httpserver.asgi import HTTPError, Receive, Scope, Send, send_bytes, send_error
from vllmd.metrics import Metrics
from vllmd.metrics import relay as engines_metrics


class MetricsApp:
    """A plain ASGI app; every other path is 404 `not_found`. `engines` lists the instances
    whose engines `/metrics/engines` relays (None: that route is not served)."""

    def __init__(
        self,
        metrics: Metrics,
        engines: Callable[[], Iterable[engines_metrics.Engine]] | None = None,
    ) -> None:
        self.metrics = metrics
        self._engines = engines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/metrics" and method == "GET":
            body, content_type = self.metrics.exposition()
            await send_bytes(send, 200, body, content_type)
        elif path == "/metrics/engines" and method == "GET" and self._engines is not None:
            body = await engines_metrics.relay(self._engines())
            await send_bytes(send, 200, body, engines_metrics.CONTENT_TYPE)
        else:
            await send_error(send, HTTPError(404, "not_found", f"no route {method} {path}"))
