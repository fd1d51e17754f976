"""A soak: many streaming clients for minutes, every stream checked byte for byte, the daemon's
RSS and open fds watched throughout.

The engine is the fast engine (bench/fast_engine.py) with one addition (this file's `engine`
mode): a streamed completion whose prompt is `soak SEED` is answered with chunks that SEED
alone decides (8-32 of them, each naming SEED and its index, of varied lengths), so a client
knows every byte it must get without asking the engine. A dropped, duplicated, reordered or
altered chunk, a status other than 200, an answer cut short and a stream not done within
`--stream-timeout` are each a break.

Each of `--clients` clients (one asyncio process on uvloop, answers parsed by httptools)
loops until `--seconds` are up: send a stream request on its keep-alive connection, read the
answer to its end (`data: [DONE]`), compare it with what its seed gives, repeat; every
`--reconnect-every` streams it opens a new connection, so the daemon also accepts and closes
connections throughout. A stream under way when the time is up is read to its end. The
daemon's VmRSS and its count of open fds are sampled every second.

After the load the daemon is given `--settle` seconds to close what it holds: the clients'
connections (closed by them), and idle upstream connections (the engine's uvicorn closes an
idle one after 5 s; the pool uses none idle longer than 4 s). The figures "after" are taken
at the first sample in that window whose fd count is back at the start's, else at its end.
Pass: no break, at least one stream completed, RSS after <= start + `--rss-growth-mb` and <
`--rss-max-mb`, fds after == fds at the start (taken after a warm-up stream and `--settle`).

The gateway's `max_connections` is set to max(1024, 2 x clients): a client that reconnects
may open its new connection before the daemon has seen its old one close.

Run: python bench/soak.py [--clients 1000] [--seconds 600]   (the time, plus ~30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

THIS = Path(__file__).resolve()
MODEL = "soak"
DONE = b"data: [DONE]\n\n"
PROMPT = re.compile(rb"^soak (\d+)$")
TAMPER = "SOAK_DROP_EVERY"  # the engine drops a chunk of every Nth stream (--drop-every)
CHUNK = b'data: {"id":"soak-%d","choices":[{"index":0,"delta":{"content":"%d:%s"}}]}\n\n'


# --- what a seed's stream is: the engine sends it, the client expects it -------------------


def chunks_of(seed: int) -> list[bytes]:
    """The SSE events of the stream for `seed`, [DONE] not included."""
    out = []
    for i in range(8 + seed % 25):
        size = 4 + (seed + 7 * i) % 29  # 8-64 hex digits: chunks of different lengths
        digest = hashlib.blake2b(b"%d:%d" % (seed, i), digest_size=size).hexdigest()
        out.append(CHUNK % (seed, i, digest.encode()))
    return out


def expected(seed: int) -> bytes:
    return b"".join(chunks_of(seed)) + DONE


def diagnose(got: bytes, seed: int) -> str:
    """What is wrong with a body that is not `expected(seed)`: a word for the summary."""
    want = [*chunks_of(seed), DONE]
    parts = [p + b"\n\n" for p in got.split(b"\n\n") if p]
    if parts == want:
        return "ok"
    if len(parts) < len(want) and all(p in want for p in parts):
        return "dropped" if parts[-1:] == [DONE] else "cut"
    if len(parts) > len(want) and set(parts) <= set(want):
        return "duplicated"
    if sorted(parts) == sorted(want):
        return "reordered"
    return "altered"


def self_check() -> None:
    """The comparison catches a dropped, a duplicated and a reordered chunk, and a cut."""
    seed = 12345
    want = [*chunks_of(seed), DONE]
    tampered = {
        "dropped": want[:3] + want[4:],
        "duplicated": want[:3] + want[2:],
        "reordered": [want[1], want[0], *want[2:]],
        "cut": want[:5],
    }
    assert diagnose(expected(seed), seed) == "ok"
    for kind, parts in tampered.items():
        body = b"".join(parts)
        assert body != expected(seed), kind
        assert diagnose(body, seed) == kind, (kind, diagnose(body, seed))
    assert expected(seed) != expected(seed + 1)


# --- engine mode: the fast engine, streams decided by the prompt's seed --------------------


def seed_of(body: bytes) -> int | None:
    try:
        prompt = json.loads(body).get("prompt", "")
    except ValueError:
        return None
    match = PROMPT.match(prompt.encode()) if isinstance(prompt, str) else None
    return int(match[1]) if match else None


def engine() -> None:
    """The fast engine; a streamed completion with prompt `soak SEED` gets chunks_of(SEED),
    less its fourth chunk in every Nth stream when SOAK_DROP_EVERY=N (the bench's own check)."""
    import fast_engine

    base = fast_engine.App

    tamper = int(os.environ.get(TAMPER, "0"))

    class Seeded(base):  # type: ignore[misc, valid-type]
        served = 0

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await super().__call__(scope, receive, send)
                return
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            seed = seed_of(body)
            if seed is None:

                async def replay() -> dict[str, Any]:
                    return {"type": "http.request", "body": body, "more_body": False}

                await super().__call__(scope, replay, send)
                return
            await send({"type": "http.response.start", "status": 200, "headers": fast_engine.SSE})
            self.served += 1
            drop = self.served % tamper == 0 if tamper else False
            for i, data in enumerate(chunks_of(seed)):
                if drop and i == 3:
                    continue
                if self.delay and i:
                    await asyncio.sleep(self.delay)
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": DONE})

    fast_engine.App = Seeded  # type: ignore[misc]  # main() builds fast_engine.App
    fast_engine.main()


# --- the client ---------------------------------------------------------------------------


def request(seed: int) -> bytes:
    data = b'{"model":"%s","prompt":"soak %d","max_tokens":64,"stream":true}' % (
        MODEL.encode(),
        seed,
    )
    return (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(data), data)
    )


class Broken(Exception):
    """A stream that did not end as a whole answer: its kind is the message."""


class Connection(asyncio.Protocol):
    """One keep-alive client connection, one stream on it at a time, parsed by httptools."""

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._done: asyncio.Future[None] | None = None
        self.body = bytearray()
        self.status = 0
        self.keep_alive = True
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("malformed")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail("cut")

    def on_message_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def _fail(self, kind: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(Broken(kind))

    async def exchange(self, data: bytes, timeout: float) -> bytes:
        """Send one request, return its answer's body once the answer is whole."""
        assert self._transport is not None
        self.body = bytearray()
        self._done = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        try:
            await asyncio.wait_for(self._done, timeout)
        except TimeoutError:
            raise Broken("timeout") from None
        if self.status != 200:
            raise Broken(f"status {self.status}")
        return bytes(self.body)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


@dataclass
class Tally:
    """What the clients did, all together."""

    completed: int = 0
    compared: int = 0  # bytes of bodies compared with what their seeds give
    breaks: Counter[str] = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)  # the first few breaks, described
    connections: int = 0

    def broke(self, client: int, seed: int, kind: str) -> None:
        self.breaks[kind] += 1
        if len(self.first) < 10:
            self.first.append(f"client {client}, seed {seed}: {kind}")


async def client(
    n: int, port: int, end: float, args: argparse.Namespace, tally: Tally, ramp: float
) -> None:
    """One client's loop: stream, compare, repeat until `end` (the loop's clock)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(ramp)
    conn: Connection | None = None
    k = 0
    try:
        while loop.time() < end:
            seed = n * 10_000_000 + k
            if conn is None or conn.closed or not conn.keep_alive or k % args.reconnect_every == 0:
                if conn is not None:
                    conn.close()
                try:
                    _, conn = await loop.create_connection(Connection, "127.0.0.1", port)
                except OSError as exc:
                    tally.broke(n, seed, f"connect: {exc.strerror or exc}")
                    conn = None
                    await asyncio.sleep(1)
                    continue
                tally.connections += 1
            k += 1
            try:
                body = await conn.exchange(request(seed), args.stream_timeout)
            except Broken as exc:
                tally.broke(n, seed, str(exc))
                conn.close()
                conn = None
                continue
            tally.compared += len(body)
            if body == expected(seed):
                tally.completed += 1
            else:
                tally.broke(n, seed, diagnose(body, seed))
    finally:
        if conn is not None:
            conn.close()


# --- the daemon's figures -----------------------------------------------------------------


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def vm_hwm_kib(pid: int) -> int:
    """The kernel's high-water mark of the RSS since reset_peak (peaks between samples too)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def descendants(pid: int) -> list[int]:
    """`pid`'s children, theirs, and so on (the engine and whatever it started)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
            kids = [
                int(c)
                for t in tasks
                for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()
            ]
        except OSError:  # gone meanwhile
            continue
        out += kids
        todo += kids
    return out


def cpu_of(pids: list[int]) -> float:
    from harness import cpu_seconds

    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            total += cpu_seconds(p)
    return total


@dataclass
class Sample:
    t: float  # seconds since the load began
    rss_kib: int
    fds: int
    completed: int


async def sampler(pid: int, began: float, tally: Tally, out: list[Sample], quiet: bool) -> None:
    """The daemon's RSS and fds every second; a progress line every 10 samples."""
    loop = asyncio.get_running_loop()
    tick = loop.time()
    while True:
        s = Sample(loop.time() - began, vm_rss_kib(pid), fd_count(pid), tally.completed)
        out.append(s)
        if not quiet and len(out) % 10 == 0:
            rate = (s.completed - out[-10].completed) / max(s.t - out[-10].t, 1e-9)
            print(
                f"  {s.t:6.0f} s: {s.completed} streams ({rate:.0f}/s), "
                f"{sum(tally.breaks.values())} breaks, RSS {s.rss_kib / 1024:.1f} MB, "
                f"{s.fds} fds",
                flush=True,
            )
        tick += 1.0
        await asyncio.sleep(max(0.0, tick - loop.time()))


@dataclass
class Load:
    tally: Tally
    samples: list[Sample]
    wall: float
    cpu: dict[str, float]  # cores busy on average during the load: client, daemon, engine


async def load(pid: int, port: int, args: argparse.Namespace) -> Load:
    """The clients' loops for `args.seconds`, sampled throughout."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    samples: list[Sample] = []
    engines = descendants(pid)
    cpu0 = (time.process_time(), cpu_of([pid]), cpu_of(engines))
    began = loop.time()
    watch = asyncio.create_task(sampler(pid, began, tally, samples, args.quiet))
    end = began + args.seconds
    ramp = min(1.0, args.seconds / 10)  # spread the first connects over up to a second
    await asyncio.gather(
        *(client(n, port, end, args, tally, ramp * n / args.clients) for n in range(args.clients))
    )
    wall = loop.time() - began
    watch.cancel()
    cpu1 = (time.process_time(), cpu_of([pid]), cpu_of(engines))
    names = ("client", "daemon", "engine")
    cpu = {name: (b - a) / wall for name, a, b in zip(names, cpu0, cpu1, strict=True)}
    return Load(tally, samples, wall, cpu)


def settle(pid: int, fds_start: int, seconds: float) -> tuple[float, int, int]:
    """Wait up to `seconds` for the daemon's fds to come back to `fds_start`: (when, RSS, fds)
    at the first sample that has them back, else at the end."""
    began = time.monotonic()
    while True:
        now = time.monotonic() - began
        rss, fds = vm_rss_kib(pid), fd_count(pid)
        if fds == fds_start or now >= seconds:
            return now, rss, fds
        time.sleep(0.5)


async def warm_up(port: int) -> None:
    """One stream, which starts the engine; it must come back whole."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, "127.0.0.1", port)
    try:
        body = await conn.exchange(request(0), 120)
    finally:
        conn.close()
    if body != expected(0):
        raise SystemExit(f"the warm-up stream came back {diagnose(body, 0)}")


def start_daemon(tmp: Path, args: argparse.Namespace, procs: Any) -> tuple[int, int]:
    """vllmd serving the seeded engine: its pid and port."""
    from harness import free_port, vllmd_argv, vllmd_config, wait_http

    port = free_port()
    env = {"FAST_CHUNK_DELAY": str(args.chunk_delay), TAMPER: str(args.drop_every)}
    config = vllmd_config(tmp, port, {MODEL: env})
    fast = json.dumps(str(THIS.parent / "fast_engine.py"))
    listen = f'listen = "127.0.0.1:{port}"'
    text = config.read_text()
    assert fast in text and listen in text, "harness.vllmd_config changed its config's shape"
    text = text.replace(fast, f'{json.dumps(str(THIS))}, "engine"')
    text = text.replace(listen, f"{listen}\nmax_connections = {max(1024, 2 * args.clients)}")
    config.write_text(text)
    proc = procs.start(vllmd_argv(config), tmp / "vllmd.log")
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return int(proc.pid), port


def raise_fd_limit(need: int) -> None:
    """Clients' sockets need fds here, and the daemon (which inherits the limit) two per
    stream: the soft limit is raised towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        print(f"warning: RLIMIT_NOFILE is {soft}, under the {need} this soak may need")


@dataclass
class Result:
    clients: int
    seconds: float
    load: Load
    rss: tuple[int, int, int]  # start, peak, after (KiB)
    fds: tuple[int, int, int]
    settled_after: float

    def failures(self, args: argparse.Namespace) -> list[str]:
        t = self.load.tally
        start, _, after = self.rss
        out = []
        if t.breaks:
            out.append(f"{sum(t.breaks.values())} broken streams")
        if not t.completed:
            out.append("no stream completed")
        if after > start + args.rss_growth_mb * 1024:
            out.append(f"RSS grew by {(after - start) / 1024:.1f} MB (> {args.rss_growth_mb})")
        if after >= args.rss_max_mb * 1024:
            out.append(f"RSS after is {after / 1024:.1f} MB (>= {args.rss_max_mb})")
        if self.fds[2] != self.fds[0]:
            out.append(f"open fds {self.fds[2]} after, {self.fds[0]} at the start")
        return out


def summary(r: Result, args: argparse.Namespace) -> list[str]:
    t = r.load.tally
    mb = [f"{k / 1024:.1f}" for k in r.rss]
    rows = [
        ("clients", f"{r.clients}"),
        ("seconds (load)", f"{r.load.wall:.1f}"),
        ("streams completed", f"{t.completed} ({t.completed / r.load.wall:.0f}/s)"),
        ("bytes compared", f"{t.compared} ({t.compared / 2**20:.1f} MiB)"),
        ("breaks", f"{sum(t.breaks.values())}" + (f" {dict(t.breaks)}" if t.breaks else "")),
        ("connections opened", f"{t.connections}"),
        ("RSS MB start/peak/after", "/".join(mb)),
        ("fds start/peak/after", "/".join(str(x) for x in r.fds)),
        ("settled after (s)", f"{r.settled_after:.1f} (of {args.settle:g} allowed)"),
        ("CPU cores: client/daemon/engine", "/".join(f"{v:.2f}" for v in r.load.cpu.values())),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    failures = r.failures(args)
    lines.append(
        f"  {'result':<{width}}  " + ("FAIL: " + "; ".join(failures) if failures else "PASS")
    )
    return lines


def bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--chunk-delay", type=float, default=0.01, help="engine's seconds per chunk")
    p.add_argument("--reconnect-every", type=int, default=25, help="streams per connection")
    p.add_argument("--stream-timeout", type=float, default=120.0)
    p.add_argument("--settle", type=float, default=15.0, help="seconds the daemon may take")
    p.add_argument("--rss-growth-mb", type=float, default=50.0)
    p.add_argument("--rss-max-mb", type=float, default=150.0)
    p.add_argument(
        "--drop-every", type=int, default=0, help="check the check: the engine drops a chunk"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    self_check()
    raise_fd_limit(4 * args.clients + 1024)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # plain asyncio still works, with a costlier client
        pass
    from harness import processes

    with tempfile.TemporaryDirectory(prefix="vllmd-soak-") as name, processes() as procs:
        tmp = Path(name)
        pid, port = start_daemon(tmp, args, procs)
        asyncio.run(warm_up(port))
        time.sleep(args.settle)  # the warm-up's upstream connection closes idle
        reset_peak(pid)
        rss0, fds0 = vm_rss_kib(pid), fd_count(pid)
        print(
            f"soak: {args.clients} clients for {args.seconds:g} s, daemon pid {pid}, "
            f"RSS {rss0 / 1024:.1f} MB, {fds0} fds",
            flush=True,
        )
        run = asyncio.run(load(pid, port, args))
        settled, rss1, fds1 = settle(pid, fds0, args.settle)
        hwm = vm_hwm_kib(pid)
        samples = run.samples
        result = Result(
            args.clients,
            args.seconds,
            run,
            (rss0, max([hwm, *(s.rss_kib for s in samples)]), rss1),
            (fds0, max([fds0, fds1, *(s.fds for s in samples)]), fds1),
            settled,
        )
    print("\nsummary")
    print("\n".join(summary(result, args)))
    for line in run.tally.first:
        print(f"  break: {line}")
    return 1 if result.failures(args) else 0


def cli() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "engine":
        sys.argv = [sys.argv[0], *sys.argv[2:]]  # the flags vllmd gives an engine
        engine()
        return
    sys.exit(bench(sys.argv[1:]))


if __name__ == "__main__":
    cli()
