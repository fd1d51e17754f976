"""A fast OpenAI-shaped upstream for the benchmarks: it answers at once.

Raw ASGI on uvicorn (httptools, uvloop), so the upstream itself costs as little as a Python
server can. Takes vLLM's flags (`--uds`, `--host`, `--port`, `--model`, others ignored), so
vllmd can start it as an engine. Environment:
  FAST_STARTUP_DELAY  seconds from its bind to its listen (default 0), as vLLM's load
  FAST_CHUNKS         SSE chunks of a streamed answer (default 16)
  FAST_CHUNK_DELAY    seconds between two chunks (default 0)
  FAST_STAMP          1: every chunk carries `"t": <time.time() when sent>`
  FAST_READY_FILE     written with time.time() once it serves (/health answers from then)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from typing import Any

import uvicorn

PLAIN = json.dumps(
    {
        "id": "cmpl-fast",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "text": " hello", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
HEALTH = b""
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


def chunk(i: int) -> bytes:
    delta = {"id": "chat-fast", "choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
    return b"data: " + json.dumps(delta).encode() + b"\n\n"


class App:
    def __init__(self, chunks: int, delay: float, stamp: bool) -> None:
        self.chunks = [chunk(i) for i in range(chunks)]
        self.delay = delay
        self.stamp = stamp

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/health" or scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": JSON})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        if b'"stream": true' in body or b'"stream":true' in body:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            for i, data in enumerate(self.chunks):
                if self.delay and i:
                    await asyncio.sleep(self.delay)
                if self.stamp:
                    data = data[:-3] + b', "t": ' + repr(time.time()).encode() + b"}\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": PLAIN})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--uds")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args, _ = p.parse_known_args()
    # As vLLM: the socket is bound at once and listens only once the engine serves, and
    # "Starting vLLM server on ..." is logged just before (vllmd polls faster from then on).
    if args.uds:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(args.uds)
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    time.sleep(float(os.environ.get("FAST_STARTUP_DELAY", "0")))
    where = f"unix:{args.uds}" if args.uds else f"http://{args.host}:{args.port}"
    print(f"INFO [entry.py:140] Starting vLLM server on {where}", flush=True)
    sock.listen(1024)
    env = os.environ.get
    app = App(
        int(env("FAST_CHUNKS", "16")), float(env("FAST_CHUNK_DELAY", "0")), bool(env("FAST_STAMP"))
    )
    config = uvicorn.Config(
        app, http="httptools", loop="uvloop", lifespan="off", log_level="warning", access_log=False
    )
    Server(config).run(sockets=[sock])


class Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if ready := os.environ.get("FAST_READY_FILE"):  # from now on /health answers 200
            with open(ready, "w") as f:  # noqa: ASYNC230 (before any request: nothing waits)
                f.write(repr(time.time()))


if __name__ == "__main__":
    main()
