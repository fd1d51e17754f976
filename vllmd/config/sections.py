"""The host-wide tables: [daemon], [gateway], [metrics], [engine], [scheduler]."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Literal, cast

from vllmd.config.reader import Table
from vllmd.config.schema import (
    DaemonConfig,
    EngineConfig,
    GatewayConfig,
    Listen,
    MetricsConfig,
    SchedulerConfig,
)

LOG_LEVELS = ("debug", "info", "warning", "error")
_PORT_RANGE_RE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")
_LISTEN_EXAMPLES = '(e.g. "127.0.0.1:8000", "[::1]:8000", ":8000")'


def resolve_path(value: str, base_dir: Path) -> Path:
    """`value` as a path; relative ones are taken from the config file's directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def parse_listen(text: str) -> Listen:
    """ "127.0.0.1:8000", "[::1]:8000", "localhost:8000" or ":8000" (all interfaces)."""
    problem = ValueError(f"{json.dumps(text)} is not a listen address {_LISTEN_EXAMPLES}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise problem
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise problem from None
    elif ":" in host:  # a bare IPv6 address is ambiguous with the port separator
        raise problem
    return Listen(host or "0.0.0.0", int(port_text))


def _listen(value: Any) -> Listen:
    if not isinstance(value, str):
        raise TypeError
    return parse_listen(value)


def parse_daemon(table: Table, base_dir: Path) -> DaemonConfig:
    d = DaemonConfig()
    state_dir = table.text("state_dir", str(d.state_dir))
    socket = table.text("control_socket", str(d.control_socket))
    uids: list[int] = []
    if table.has("control_allow_uids"):
        raw = table.data["control_allow_uids"]
        if not isinstance(raw, list) or not all(
            isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in raw
        ):
            table.problem("control_allow_uids", "expected a list of user ids (integers >= 0)")
        else:
            uids = raw
    return DaemonConfig(
        state_dir=resolve_path(state_dir, base_dir),
        control_socket=resolve_path(socket, base_dir),
        control_socket_mode=table.read(
            "control_socket_mode", d.control_socket_mode, _file_mode, 'an octal string ("0660")'
        ),
        control_socket_group=table.text("control_socket_group", d.control_socket_group),
        control_allow_uids=tuple(uids),
        log_level=table.choice("log_level", d.log_level, LOG_LEVELS),
        event_retention=_retention(table, d.event_retention),
    )


def _retention(table: Table, default: float) -> float:
    seconds = table.duration("event_retention", default)
    if seconds <= 0:
        table.problem("event_retention", "must be longer than 0 (events are kept this long)")
        return default
    return seconds


def _positive(table: Table, name: str, default: float) -> float:
    seconds = table.duration(name, default)
    if seconds <= 0:
        table.problem(name, "must be longer than 0")
        return default
    return seconds


def _file_mode(value: Any) -> int:
    # TOML has octal integers (0o660) too; a decimal 660 lands above 0o777 and is refused.
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        mode = int(value, 8)
    elif isinstance(value, str):
        raise ValueError(f'{json.dumps(value)} is not an octal file mode (e.g. "0660")')
    else:
        raise TypeError
    if not 0 <= mode <= 0o777:
        raise ValueError(f'{value} is not a file mode (e.g. "0660")')
    return mode


def parse_gateway(table: Table, base_dir: Path) -> GatewayConfig:
    d = GatewayConfig()
    keys = list(table.strings("api_keys", secret=True))
    keys_file: Path | None = None
    file_text = table.text("api_keys_file", "")
    if file_text:
        keys_file = resolve_path(file_text, base_dir)
        try:
            lines = keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            table.problem("api_keys_file", f"cannot read {keys_file}: {_reason(exc)}")
        else:
            keys += [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if any(not key.strip() for key in keys):
        table.problem("api_keys", "an API key is empty")
    gateway = GatewayConfig(
        listen=table.read("listen", d.listen, _listen, "a string"),
        api_keys=tuple(dict.fromkeys(keys)),
        api_keys_file=keys_file,
        allow_unauthenticated=table.flag("allow_unauthenticated", d.allow_unauthenticated),
        max_body=table.size("max_body", d.max_body),
        client_body_timeout=_positive(table, "client_body_timeout", d.client_body_timeout),
        max_connections=table.integer("max_connections", d.max_connections, minimum=1),
        queue_timeout=table.duration("queue_timeout", d.queue_timeout),
        max_queue=table.integer("max_queue", d.max_queue, minimum=0),
        max_queue_total=table.integer("max_queue_total", d.max_queue_total, minimum=0),
        upstream_connect_timeout=table.duration(
            "upstream_connect_timeout", d.upstream_connect_timeout
        ),
    )
    # Security: an open, unauthenticated OpenAI endpoint must be asked for explicitly.
    if not gateway.listen.is_loopback() and not keys and not gateway.allow_unauthenticated:
        table.problem(
            "listen",
            f'"{gateway.listen}" is not a loopback address and no API keys are set '
            "(set gateway.api_keys or gateway.api_keys_file, "
            "or gateway.allow_unauthenticated = true)",
        )
    return gateway


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def parse_metrics(table: Table) -> MetricsConfig:
    def convert(value: Any) -> Listen | None:
        return None if value == "" else _listen(value)

    return MetricsConfig(listen=table.read("listen", None, convert, "a string"))


def parse_engine(table: Table, base_dir: Path) -> EngineConfig:
    d = EngineConfig()
    command = table.strings("command", d.command)
    if not command or not command[0]:
        table.problem("command", "must name a program")
        command = d.command
    elif "/" in command[0] or command[0].startswith("~"):
        # "./venv/bin/vllm" is relative to the config file; a bare "vllm" is looked up in PATH.
        command = (str(resolve_path(command[0], base_dir)), *command[1:])
    transport = table.choice("transport", d.transport, ("uds", "tcp"))
    return EngineConfig(
        command=command,
        model_flag=table.text("model_flag", d.model_flag),
        transport=cast(Literal["uds", "tcp"], transport),
        port_range=table.read("port_range", d.port_range, _port_range, 'a string ("A-B")'),
        startup_timeout=table.duration("startup_timeout", d.startup_timeout),
        stop_timeout=table.duration("stop_timeout", d.stop_timeout),
        drain_timeout=table.duration("drain_timeout", d.drain_timeout),
        health_interval=table.duration("health_interval", d.health_interval),
        health_failures=table.integer("health_failures", d.health_failures, minimum=1),
        max_concurrent_starts=table.integer(
            "max_concurrent_starts", d.max_concurrent_starts, minimum=1
        ),
        gpu_overhead=table.size("gpu_overhead", d.gpu_overhead),
        env=table.mapping("env", secret=True),
    )


def _port_range(value: Any) -> tuple[int, int]:
    if not isinstance(value, str):
        raise TypeError
    match = _PORT_RANGE_RE.fullmatch(value)
    if match:
        low, high = int(match.group(1)), int(match.group(2))
        if 1 <= low <= high <= 65535:
            return low, high
    raise ValueError(f'{json.dumps(value)} is not a port range "A-B" with 1 <= A <= B <= 65535')


def parse_scheduler(table: Table) -> SchedulerConfig:
    d = SchedulerConfig()
    evict_to = table.choice("evict_to", d.evict_to, ("sleep", "stop"))
    return SchedulerConfig(
        headroom=table.size("headroom", d.headroom),
        min_residency=table.duration("min_residency", d.min_residency),
        idle_ttl=table.duration("idle_ttl", d.idle_ttl),
        evict_to=cast(Literal["sleep", "stop"], evict_to),
        host_memory=table.size("host_memory", d.host_memory),
        sleep_residue=table.size("sleep_residue", d.sleep_residue),
        sleep_ttl=table.duration("sleep_ttl", d.sleep_ttl),
    )
