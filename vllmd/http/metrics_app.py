"""The separate Prometheus listener (`[metrics] listen`): `GET /metrics` and nothing else."""

from __future__ import annotations

from vllmd.http.asgi import HTTPError, Receive, Scope, Send, send_bytes, send_error
from vllmd.metrics import Metrics


class MetricsApp:
    """A plain ASGI app: vllmd's own metrics; every other path is 404 `not_found`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/metrics" and method == "GET":
            body, content_type = self.metrics.exposition()
            await send_bytes(send, 200, body, content_type)
        else:
            await send_error(send, HTTPError(404, "not_found", f"no route {method} {path}"))
