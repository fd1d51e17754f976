"""Chaos: faults injected at random (seeded) into a real vllmd under steady client traffic.

A real `vllmd serve` (a subprocess) supervises three fake engines (tests/fakes/fake_engine.py)
on one declared cpu device that holds two of them: `hot` (priority 1, all the client traffic),
`b` (ignores SIGTERM, so its stops take `stop_timeout`) and `c` (spawns a child in its group
and one that escapes it). A few clients send plain and streamed completions to `hot`, each
with a timeout. Every round injects one fault, chosen from a shuffled balanced schedule:

  engine_kill        an engine is SIGKILLed
  engine_stop_cont   an engine is SIGSTOPped, then SIGCONTed a moment later
  engine_stop_left   an engine is SIGSTOPped and left for the health check to restart
  daemon_mid_load    the daemon is SIGKILLed while a lazy start (a client's request) is under way
  daemon_mid_evict   the daemon is SIGKILLed while a load evicts another model
  daemon_mid_write   the daemon is SIGKILLed during a burst of control verbs (events, pins)

and the daemon is started again after each of its deaths. This process is a child subreaper
(PR_SET_CHILD_SUBREAPER), so what a killed daemon leaves is re-parented here and reaped here.

After each daemon restart and at the end it checks:
  - orphans: no engine process (found by a token in the environment every engine of this run
    inherits) alive that does not descend from the running daemon, once it answers (its crash
    recovery done); at the end, after a clean stop, none alive at all;
  - zombies: none among this process's children or the daemon's;
  - the store: `PRAGMA integrity_check` = ok on a copy of state_dir/vllmd.db taken while the
    daemon is dead, no file moved aside as corrupt, every event id of the previous copy kept
    and every new one above them;
  - clients: every request answered (a complete stream, an SSE error event, or an OpenAI-shaped
    status); a connection cut while the daemon was being killed is allowed and counted apart;
    none past its timeout.

Run: python bench/chaos.py [--rounds 20] [--seed N] [--clients 4]   (~3-6 minutes; loopback)
Exit status 1 on any orphan, zombie, bad store, unanswered client or engine left unrecovered.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
FAKE_ENGINE = ROOT / "tests" / "fakes" / "fake_engine.py"
PR_SET_CHILD_SUBREAPER = 36
TOKEN_ENV = "VLLMD_CHAOS_RUN"  # in every engine's environment (inherited by its processes)
KINDS = (
    "engine_kill",
    "engine_stop_cont",
    "engine_stop_left",
    "daemon_mid_load",
    "daemon_mid_evict",
    "daemon_mid_write",
)
# model: (priority, env)
MODELS: dict[str, tuple[int, dict[str, str]]] = {
    "hot": (1, {"FAKE_STARTUP_DELAY": "0.5"}),
    "b": (0, {"FAKE_STARTUP_DELAY": "1.0", "FAKE_MODE": "ignore_sigterm"}),
    "c": (0, {"FAKE_STARTUP_DELAY": "1.5", "FAKE_SPAWN_CHILDREN": "1"}),
}
BUSY = {"starting", "draining", "stopping", "waking"}
SETTLE = 3.0  # seconds a stray engine process must outlive before it counts


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- processes, read from /proc ----------------------------------------------------------------


def stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return "?"


def descends_from(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        info = stat(pid)
        if info is None:
            return False
        pid, seen = info[1], seen + 1
        if pid == ancestor:
            return True
    return False


def engine_processes(token: str) -> dict[int, dict[str, str]]:
    """This run's engine processes alive (zombies left out): pid -> environment."""
    found = {}
    for pid in pids():
        info = stat(pid)
        if info is None or info[0] in "ZX":
            continue
        env = environ(pid)
        if env.get(TOKEN_ENV) == token:
            found[pid] = env
    return found


def zombie_children(parent: int) -> list[int]:
    return [p for p in pids() if (s := stat(p)) is not None and s[0] == "Z" and s[1] == parent]


def describe(pid: int, env: dict[str, str]) -> str:
    info = stat(pid)
    parent = info[1] if info else "?"
    state = info[0] if info else "?"
    marker = env.get("VLLMD_INSTANCE", "-")
    return f"pid {pid} ({state}, parent {parent}, marker {marker}): {cmdline(pid)[:120]}"


# --- the daemon ------------------------------------------------------------------------------


def write_config(tmp: Path, port: int, token: str) -> Path:
    lines = [
        "[daemon]",
        f'state_dir = "{tmp}/state"',
        f'control_socket = "{tmp}/ctl.sock"',
        "[gateway]",
        f'listen = "127.0.0.1:{port}"',
        'queue_timeout = "10s"',
        "[engine]",
        f"command = [{json.dumps(sys.executable)}, {json.dumps(str(FAKE_ENGINE))}]",
        'model_flag = "--model"',
        'startup_timeout = "20s"',
        'stop_timeout = "2s"',
        'drain_timeout = "1s"',
        'health_interval = "500ms"',
        "health_failures = 2",
        f"env = {{ {TOKEN_ENV} = {json.dumps(token)} }}",
        "[scheduler]",
        'min_residency = "0s"',
        'evict_to = "stop"',
        "[devices.cpu0]",  # 7 GiB less 1 GiB headroom: two models of 3 GiB, never three
        'kind = "cpu"',
        'memory = "7GiB"',
    ]
    for name, (priority, env) in MODELS.items():
        knobs = {**env, "FAKE_TOKENS": "8", "FAKE_TOKEN_DELAY": "0.03"}
        table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in knobs.items())
        lines += [f"[models.{name}]", f'model = "fake/{name}"', 'devices = ["cpu0"]']
        lines += ['memory = "3GiB"', "cpus = 0", f"priority = {priority}", f"env = {{ {table} }}"]
    path = tmp / "vllmd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """One `vllmd serve` at a time: started, SIGKILLed, started again, stopped at the end."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.control = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(config.parent / "ctl.sock")),
            base_url="http://vllmd",
            timeout=30,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def start(self, deadline: float = 60.0) -> float:
        """Start it and wait until the gateway answers (crash recovery is done by then);
        returns the seconds that took."""
        began = time.monotonic()
        argv = [sys.executable, "-m", "vllmd.cli.entry", "serve", "--config", str(self.config)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*argv, "--log-format", "json"], stdout=out, stderr=out, cwd=ROOT
            )
        with httpx.Client(timeout=1.0) as http:
            while time.monotonic() - began < deadline:
                if self.proc.poll() is not None:
                    raise Failure(f"vllmd exited with {self.proc.returncode} at start")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                        return time.monotonic() - began
                time.sleep(0.02)
        raise Failure(f"vllmd did not answer within {deadline} s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM; its exit status (SIGKILL after `timeout`: a negative status)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)

    def reap_own(self) -> None:
        if self.proc is not None:
            self.proc.poll()

    def models(self) -> dict[str, dict[str, Any]]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = self.control.get("/v1/models")
            if answer.status_code == 200:
                return {m["name"]: m for m in answer.json()["models"]}
        return {}

    def verb(self, model: str, verb: str, wait: bool = True, timeout: float = 25.0) -> int:
        """A control verb; its status (0 when the daemon did not answer)."""
        query = f"?timeout={timeout:g}" if wait else "?wait=false"
        try:
            path = f"/v1/models/{model}/{verb}{query}"
            return self.control.post(path, timeout=timeout + 5).status_code
        except httpx.HTTPError:
            return 0

    def wait_state(
        self, model: str, ok: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            view = self.models().get(model)
            if view is not None and ok(view):
                return view
            time.sleep(0.02)
        return None


class Failure(Exception):
    """The run cannot go on (the daemon would not start)."""


# --- clients ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw, by outcome."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)  # of the OpenAI-shaped error statuses
    problems: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def add(self, outcome: str, seconds: float, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "openai_status" and problem:
                self.codes[problem] += 1
                problem = None
            self.slowest = max(self.slowest, seconds)
            if problem is not None:
                self.problems.append(problem)


ANSWERED = ("complete", "sse_error", "openai_status")


class Clients:
    """Client threads sending completions to one model while the daemon is up (they wait
    while it is down); each request classified once it ends."""

    def __init__(self, port: int, n: int, timeout: float, seed: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.n, self.timeout, self.seed = n, timeout, seed
        self.up, self.done = threading.Event(), threading.Event()
        self.kills: list[float] = []  # monotonic times the daemon was about to be SIGKILLed
        self.tally = Tally()
        self.threads: list[threading.Thread] = []
        self.began = time.monotonic()

    def start(self) -> None:
        for i in range(self.n):
            thread = threading.Thread(target=self._loop, args=(i,), name=f"client-{i}")
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.done.set()
        self.up.set()
        for thread in self.threads:
            thread.join(self.timeout + 10)

    def daemon_dies(self) -> None:
        """Called just before the daemon is SIGKILLed: new requests wait, cuts are excused."""
        self.up.clear()
        self.kills.append(time.monotonic())

    def _loop(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        # No keep-alive: a connection the server closed while idle is never reused, so a
        # reset seen here is one of the request's own.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=self.timeout, limits=limits) as http:
            while not self.done.is_set():
                self.up.wait()
                if self.done.is_set():
                    return
                self.send(http, "hot", stream=rng.random() < 0.5)
                time.sleep(rng.uniform(0.05, 0.3))

    def send(self, http: httpx.Client, model: str, stream: bool) -> None:
        """One request, classified into the tally."""
        began = time.monotonic()
        body = {"model": model, "prompt": "hello", "max_tokens": 8, "stream": stream}
        try:
            outcome, problem = self._exchange(http, body, began)
        except httpx.TimeoutException as exc:
            outcome, problem = "timed_out", f"{type(exc).__name__} after {self.timeout} s"
        except httpx.TransportError as exc:
            outcome, problem = "cut", f"{type(exc).__name__}: {exc}"
        ended = time.monotonic()
        if outcome == "cut" and any(began - 0.1 <= k <= ended for k in self.kills):
            outcome, problem = "reset_at_daemon_death", None
        if outcome == "openai_status":
            pass  # the problem names its status and code: tallied
        elif outcome in ANSWERED or outcome == "reset_at_daemon_death":
            problem = None
        else:
            kind = "stream" if stream else "plain"
            at = began - self.began
            problem = f"{kind} request to {model} at +{at:.1f} s: {outcome}: {problem}"
        self.tally.add(outcome, ended - began, problem)

    def _exchange(
        self, http: httpx.Client, body: dict[str, Any], began: float
    ) -> tuple[str, str | None]:
        with http.stream("POST", self.url, json=body) as answer:
            if answer.status_code != 200 or not body["stream"]:
                data = answer.read()
                return _plain(answer.status_code, data)
            for line in answer.iter_lines():
                if time.monotonic() - began > self.timeout:
                    return "timed_out", "the stream ran past the timeout"
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "complete", None
                with contextlib.suppress(ValueError):
                    if "error" in json.loads(line[6:]):
                        return "sse_error", None
            return "cut", "the stream ended with neither [DONE] nor an error event"


def _plain(status: int, data: bytes) -> tuple[str, str | None]:
    try:
        parsed = json.loads(data)
    except ValueError:
        return "bad_answer", f"status {status}, not JSON: {data[:200]!r}"
    if status == 200 and isinstance(parsed, dict) and parsed.get("choices"):
        return "complete", None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if status >= 400 and isinstance(error, dict) and {"message", "type", "code"} <= set(error):
        return "openai_status", f"{status} {error['code']}"
    return "bad_answer", f"status {status}: {data[:200]!r}"


# --- the checks --------------------------------------------------------------------------------


@dataclass
class Findings:
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    zombies: list[str] = field(default_factory=list)
    store_ok: int = 0
    store_bad: list[str] = field(default_factory=list)
    unrecovered: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Checker:
    """The orphan, zombie and store checks, and this process's reaping."""

    def __init__(self, tmp: Path, token: str, daemon: Daemon, found: Findings) -> None:
        self.tmp, self.token, self.daemon, self.found = tmp, token, daemon, found
        self.state = tmp / "state"
        self.ids: set[int] = set()
        self.copies = 0

    def reap(self) -> None:
        """Reap this process's dead children: what a killed daemon left (re-parented here)."""
        self.daemon.reap_own()
        for pid in zombie_children(os.getpid()):
            if pid != self.daemon.pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def zombies(self, when: str) -> None:
        """Zombies of this process (after reaping) or of the daemon that outlast a second."""
        self.reap()
        first = set(zombie_children(os.getpid())) | set(zombie_children(self.daemon.pid))
        if not first:
            return
        time.sleep(1.0)
        self.reap()
        for pid in first & (
            set(zombie_children(os.getpid())) | set(zombie_children(self.daemon.pid))
        ):
            self.found.zombies.append(f"{when}: zombie {pid} ({cmdline(pid) or 'reaped name'})")

    def orphans(self, when: str) -> None:
        """Engine processes that do not descend from the running daemon: killed here once
        counted, so one finding does not spoil every later round."""
        self.reap()
        for pid, env in engine_processes(self.token).items():
            if not descends_from(pid, self.daemon.pid):
                self.found.orphans.append(f"{when}: {describe(pid, env)}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        self.reap()

    def strays(self, when: str) -> None:
        """Processes of an engine that is no longer any model's (its marker is no running
        engine's) that outlive SETTLE seconds under the running daemon."""

        def current() -> dict[int, str]:
            live = {v["pid"] for v in self.daemon.models().values() if v.get("pid")}
            procs = engine_processes(self.token)
            markers = {procs[p].get("VLLMD_INSTANCE") for p in live if p in procs}
            return {
                pid: describe(pid, env)
                for pid, env in procs.items()
                if env.get("VLLMD_INSTANCE") not in markers
            }

        first = current()
        if not first:
            return
        time.sleep(SETTLE)
        later = current()
        for pid in first.keys() & later.keys():
            self.found.strays.append(f"{when}: {later[pid]}")

    def store(self, when: str) -> None:
        """Integrity and event ids of the state database, on a copy (the daemon is dead or
        stopped: the files are still)."""
        copy = self.tmp / f"copy-{self.copies}"
        self.copies += 1
        copy.mkdir()
        for suffix in ("", "-wal", "-shm"):
            src = self.state / f"vllmd.db{suffix}"
            if src.exists():
                shutil.copy2(src, copy / src.name)
        problems = []
        aside = sorted(p.name for p in self.state.glob("vllmd.db.corrupt-*"))
        if aside:
            problems.append(f"moved aside as corrupt: {aside}")
        try:
            with contextlib.closing(sqlite3.connect(copy / "vllmd.db")) as conn:
                check = [row[0] for row in conn.execute("PRAGMA integrity_check")]
                ids = [row[0] for row in conn.execute("SELECT id FROM events ORDER BY rowid")]
        except sqlite3.Error as exc:
            problems.append(f"cannot read: {exc}")
            check, ids = [], []
        if check and check != ["ok"]:
            problems.append(f"integrity_check: {check[:5]}")
        if ids != sorted(set(ids)):
            problems.append("event ids not increasing in table order")
        lost = self.ids - set(ids)
        if lost:
            problems.append(f"{len(lost)} event ids of the previous copy gone, e.g. {min(lost)}")
        new = set(ids) - self.ids
        if self.ids and new and min(new) <= max(self.ids):
            problems.append(f"new event id {min(new)} not above the previous {max(self.ids)}")
        if not ids:
            problems.append("no events")
        if problems:
            self.found.store_bad.append(f"{when}: " + "; ".join(problems))
        else:
            self.found.store_ok += 1
        self.ids |= set(ids)
        shutil.rmtree(copy, ignore_errors=True)


# --- the faults --------------------------------------------------------------------------------


class Chaos:
    def __init__(
        self, rng: random.Random, daemon: Daemon, clients: Clients, checker: Checker
    ) -> None:
        self.rng, self.daemon, self.clients, self.checker = rng, daemon, clients, checker
        self.found = checker.found

    def run(self, kind: str, when: str) -> None:
        fault = getattr(self, kind)
        if fault(when):
            self.found.faults[kind] += 1
        else:
            self.found.skipped[kind] += 1

    # -- engines --------------------------------------------------------------------------------

    def _target(self) -> tuple[str, int] | None:
        """A ready engine, `hot` (the one with traffic) more often than not."""
        self.daemon.wait_state("hot", lambda v: v["state"] == "ready", 20)
        ready = {n: v["pid"] for n, v in self.daemon.models().items() if v["state"] == "ready"}
        if not ready:
            return None
        name = "hot" if "hot" in ready and self.rng.random() < 0.7 else self.rng.choice(list(ready))
        return name, int(ready[name])

    def _recovered(self, name: str, old: int, when: str, timeout: float = 25.0) -> None:
        """The model serves again from a live, running engine (not the faulted one, unless it
        was continued)."""

        def ok(view: dict[str, Any]) -> bool:
            pid = view.get("pid")
            info = stat(int(pid)) if pid else None
            return view["state"] == "ready" and info is not None and info[0] not in "TtZ"

        view = self.daemon.wait_state(name, ok, timeout)
        if view is None:
            last = self.daemon.models().get(name, {})
            self.found.unrecovered.append(
                f"{when}: {name} (engine {old}) not ready within {timeout:g} s: "
                f"state {last.get('state')}, pid {last.get('pid')}, error {last.get('error')}"
            )

    def engine_kill(self, when: str) -> bool:
        target = self._target()
        if target is None:
            return False
        name, pid = target
        os.kill(pid, signal.SIGKILL)
        time.sleep(self.rng.uniform(0.5, 2.0))
        self._recovered(name, pid, when)
        return True

    def engine_stop_cont(self, when: str) -> bool:
        target = self._target()
        if target is None:
            return False
        name, pid = target
        os.kill(pid, signal.SIGSTOP)
        time.sleep(self.rng.uniform(0.2, 2.5))  # before or after the health check gives up
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self._recovered(name, pid, when)
        return True

    def engine_stop_left(self, when: str) -> bool:
        target = self._target()
        if target is None:
            return False
        name, pid = target
        os.kill(pid, signal.SIGSTOP)
        self._recovered(name, pid, when)
        end = time.monotonic() + 10
        while (info := stat(pid)) is not None and info[0] != "Z" and time.monotonic() < end:
            time.sleep(0.05)
        if info is not None and info[0] != "Z":
            self.found.unrecovered.append(f"{when}: stopped engine {pid} of {name} still there")
            os.kill(pid, signal.SIGKILL)
        return True

    # -- the daemon -----------------------------------------------------------------------------

    def _prepare(self, ready: tuple[str, ...], stopped: tuple[str, ...]) -> None:
        for name in ("b", "c"):
            self.daemon.verb(name, "unpin")
        for name in stopped:
            self.daemon.verb(name, "unload")
        for name in ready:
            self.daemon.verb(name, "load")

    def daemon_mid_load(self, when: str) -> bool:
        """A client's request for a stopped model starts it; the daemon dies during the start."""
        self._prepare((), ("b", "c"))
        name = self.rng.choice(["b", "c"])
        trigger = threading.Thread(target=self._one_request, args=(name,), name="lazy")
        trigger.start()
        view = self.daemon.wait_state(name, lambda v: v["state"] == "starting", 10)
        if view is None:
            self.found.notes.append(f"{when}: {name} never seen starting")
            trigger.join(40)
            return False
        delay = float(MODELS[name][1]["FAKE_STARTUP_DELAY"])
        time.sleep(self.rng.uniform(0.0, delay))
        self._restart(when, f"{name} {self.daemon.models().get(name, {}).get('state')}")
        trigger.join(40)
        return True

    def daemon_mid_evict(self, when: str) -> bool:
        """b is ready and never used, c stopped: loading c must stop b (2 s: b ignores
        SIGTERM); the daemon dies during the stop, or as c starts."""
        self._prepare(("b",), ("c",))
        self.daemon.wait_state("hot", lambda v: v["state"] == "ready", 15)
        self.daemon.verb("c", "load", wait=False)
        view = self.daemon.wait_state("b", lambda v: v["state"] in BUSY | {"stopped"}, 10)
        if view is None:
            self.found.notes.append(f"{when}: loading c never evicted b")
            return False
        time.sleep(self.rng.uniform(0.0, 2.5))
        states = {n: v["state"] for n, v in self.daemon.models().items()}
        self._restart(when, f"b {states.get('b')}, c {states.get('c')}")
        return True

    def daemon_mid_write(self, when: str) -> bool:
        """Control verbs in a loop (each a `control` event, pins written, engines spawned and
        stopped); the daemon dies in the middle of them."""
        stop = threading.Event()

        def burst(ops: list[tuple[str, str]]) -> None:
            while not stop.is_set():
                for model, verb in ops:
                    if self.daemon.verb(model, verb, wait=False) == 0:
                        return  # the daemon is gone

        loops = [
            threading.Thread(target=burst, args=([("b", "pin"), ("b", "unpin")],)),
            threading.Thread(target=burst, args=([("c", "load"), ("c", "unload")],)),
        ]
        for loop in loops:
            loop.start()
        time.sleep(self.rng.uniform(0.3, 2.0))
        stop.set()  # each loop's verb under way is the last: none reaches the next daemon
        self._restart(when, "a burst of control verbs")
        for loop in loops:
            loop.join(40)
        return True

    def _one_request(self, model: str) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=self.clients.timeout, limits=limits) as http:
            self.clients.send(http, model, stream=self.rng.random() < 0.5)

    def _restart(self, when: str, moment: str) -> None:
        """SIGKILL the daemon; check the store it left; start it again; check for orphans
        and zombies once it answers."""
        self.clients.daemon_dies()
        self.daemon.kill()
        left = len(engine_processes(self.checker.token))
        self.checker.store(f"{when} (killed: {moment})")
        took = self.daemon.start()
        self.found.restarts += 1
        self.found.restart_seconds.append(took)
        self.checker.orphans(f"{when} after restart ({left} engine processes left behind)")
        self.checker.zombies(f"{when} after restart")
        self.clients.up.set()


# --- the run -----------------------------------------------------------------------------------


def schedule(rng: random.Random, rounds: int) -> list[str]:
    """Every kind as often as the rounds allow, in a shuffled order."""
    kinds = [KINDS[i % len(KINDS)] for i in range(rounds)]
    rng.shuffle(kinds)
    return kinds


def run(args: argparse.Namespace, tmp: Path) -> tuple[Findings, Tally, int, int]:
    rng = random.Random(args.seed)
    token = secrets.token_hex(8)
    port = free_port()
    config = write_config(tmp, port, token)
    daemon = Daemon(config, port, tmp / "daemon.log")
    found = Findings()
    checker = Checker(tmp, token, daemon, found)
    clients = Clients(port, args.clients, args.timeout, args.seed)
    chaos = Chaos(rng, daemon, clients, checker)
    rc, rounds = 0, 0
    began = time.monotonic()
    daemon.start()
    clients.up.set()
    clients.start()
    try:
        for i, kind in enumerate(schedule(rng, args.rounds)):
            if time.monotonic() - began > args.max_seconds:
                found.notes.append(f"stopped after {i} rounds: --max-seconds {args.max_seconds}")
                break
            when = f"round {i + 1} {kind}"
            print(f"[{time.monotonic() - began:6.1f} s] {when}", flush=True)
            chaos.run(kind, when)
            rounds += 1
            time.sleep(rng.uniform(2.0, 5.0))  # steady traffic between faults
            checker.strays(when)
            checker.zombies(when)
    finally:
        clients.close()
        rc = daemon.stop()
        time.sleep(1.0)
        checker.orphans("after the final stop")
        checker.zombies("after the final stop")
        checker.store("after the final stop")
        for pid in engine_processes(token):  # leave nothing behind, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        checker.reap()
        daemon.control.close()
    return found, clients.tally, rc, rounds


def summary(found: Findings, tally: Tally, rc: int, rounds: int, seed: int) -> bool:
    """Print the table; True when nothing failed."""
    out = tally.outcomes
    answered = sum(out[k] for k in ANSWERED)
    failed = {k: n for k, n in out.items() if k not in ANSWERED and k != "reset_at_daemon_death"}
    unanswered = sum(failed.values())
    took = found.restart_seconds
    faults = []
    for kind in KINDS:
        skipped = f" ({found.skipped[kind]} skipped)" if found.skipped[kind] else ""
        faults.append((f"faults: {kind}", f"{found.faults[kind]}{skipped}"))
    starts = f" (start {min(took):.1f}-{max(took):.1f} s)" if took else ""
    kinds = f"complete {out['complete']}, sse error {out['sse_error']}"
    kinds += f", openai status {out['openai_status']}"
    why = " (" + ", ".join(f"{k} {n}" for k, n in failed.items()) + ")" if failed else ""
    rows = [
        ("seed", str(seed)),
        ("rounds", str(rounds)),
        *faults,
        ("daemon restarts", f"{found.restarts}{starts}"),
        ("orphans", str(len(found.orphans))),
        ("stray engine processes", str(len(found.strays))),
        ("zombies", str(len(found.zombies))),
        ("store checks ok", f"{found.store_ok} of {found.store_ok + len(found.store_bad)}"),
        ("engine faults unrecovered", str(len(found.unrecovered))),
        ("clients answered", f"{answered} ({kinds})"),
        ("openai statuses", ", ".join(f"{k} {n}" for k, n in sorted(tally.codes.items())) or "-"),
        ("clients reset at daemon death", str(out["reset_at_daemon_death"])),
        ("clients unanswered", f"{unanswered}{why}"),
        ("slowest client (s)", f"{tally.slowest:.1f}"),
        ("final stop exit status", str(rc)),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    details = [
        ("orphan", found.orphans),
        ("stray", found.strays),
        ("zombie", found.zombies),
        ("store", found.store_bad),
        ("unrecovered", found.unrecovered),
        ("client", tally.problems[:20]),
        ("note", found.notes),
    ]
    for label, items in details:
        for item in items:
            print(f"  {label}: {item}")
    bad = found.orphans or found.strays or found.zombies or found.store_bad or found.unrecovered
    return not bad and unanswered == 0 and rc == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0, help="each client request's (s)")
    p.add_argument("--max-seconds", type=float, default=480.0, help="no round starts after it")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs, db)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    print(f"chaos: seed {args.seed}, {args.rounds} rounds, {args.clients} clients", flush=True)
    become_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="vllmd-chaos-"))
    try:
        found, tally, rc, rounds = run(args, tmp)
    except Failure as exc:
        print(f"chaos: {exc}; see {tmp}/daemon.log", file=sys.stderr)
        return 1
    ok = summary(found, tally, rc, rounds, args.seed)
    if ok and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"run directory kept: {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
