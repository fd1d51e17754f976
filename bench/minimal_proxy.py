"""The bound of a Python gateway on this stack, for the suite to compare vllmd with: uvicorn
(httptools, uvloop) serving a raw ASGI app that parses the body for `model` and forwards it
with vllmd's own upstream pool, with none of vllmd's queues, leases, metrics, log lines or
disconnect watching.

Run: python bench/minimal_proxy.py PORT UPSTREAM_PORT [uvicorn|vllmd]
(`vllmd`: the same app on vllmd's own HTTP server, `vllmd.httpserver.server`, instead of uvicorn.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any

import uvicorn
import uvloop

from vllmd.engine.upstream import Pool
from vllmd.httpserver.server import Server

DROP = {b"host", b"content-length", b"connection", b"transfer-encoding"}


def app_for(upstream: int) -> Any:
    pool: Pool | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal pool
        if scope["type"] != "http":
            return
        if pool is None:
            pool = Pool(port=upstream)
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        json.loads(body)["model"]  # what any gateway must read
        headers = [(k, v) for k, v in scope["headers"] if k not in DROP]
        response = await pool.post(scope["path"], body, headers)
        data = await response.aread()
        await response.aclose()
        out = [(k, v) for k, v in response.headers if k.lower() not in DROP]
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": data})

    return app


async def own_server(port: int, upstream: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    sock.setblocking(False)
    await Server(app_for(upstream), max_connections=4096, graceful=1).start(sock)
    await asyncio.Event().wait()


def main() -> None:
    port, upstream = int(sys.argv[1]), int(sys.argv[2])
    if sys.argv[3:] == ["vllmd"]:
        uvloop.run(own_server(port, upstream))
        return
    uvicorn.run(
        app_for(upstream),
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
