"""doctor's port checks: each listen address is free, or held by the daemon doctor reached."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil

from vllmd.cli.check import Check
from vllmd.config import Config, Listen
from vllmd.errors import ListenFailed


def port_checks(config: Config, status: Mapping[str, Any] | None) -> list[Check]:
    """Each listen address is free, or held by the daemon doctor reached (`status`)."""
    listeners = [("gateway port", config.gateway.listen, "gateway.listen")]
    if config.metrics.listen is not None:
        listeners.append(("metrics port", config.metrics.listen, "metrics.listen"))
    daemon = DaemonSeen(int(status["pid"]), status.get("config_path")) if status else None
    return [_port_check(name, listen, key, config, daemon) for name, listen, key in listeners]


@dataclass(frozen=True, slots=True)
class DaemonSeen:
    pid: int
    config_path: str | None  # the config it runs, as it says


def _port_check(
    name: str, listen: Listen, key: str, config: Config, daemon: DaemonSeen | None
) -> Check:
    from vllmd.daemon import bind  # the daemon's own bind: same family, same options

    try:
        bind(listen, key).close()
    except ListenFailed as exc:
        failed = Check(
            "FAIL",
            name,
            str(exc),
            f"stop what listens there (`ss -ltnp 'sport = :{listen.port}'`) or change {key}",
        )
        if daemon is None:
            return failed
        held = listens_on(daemon.pid, listen)
        if held:
            return Check("PASS", name, f"{listen} held by the running vllmd, pid {daemon.pid}")
        if held is None:  # its sockets are not readable here (another uid, pid namespace)
            if config.path is not None and str(config.path) == daemon.config_path:
                return Check(
                    "PASS",
                    name,
                    f"{listen} in use; the running vllmd (pid {daemon.pid}) runs this config",
                )
            return Check(
                "WARN",
                name,
                f"{listen} in use; uid {os.getuid()} cannot see whether the running vllmd "
                f"(pid {daemon.pid}) holds it",
                f"run doctor as root or the daemon's user, or `ss -ltnp 'sport = :{listen.port}'`",
            )
        return failed
    return Check("PASS", name, f"{listen} is free")


def listens_on(pid: int, listen: Listen) -> bool | None:
    """Whether process `pid` has a TCP socket listening where `listen` would bind (one that
    keeps `listen` from binding); None when its sockets cannot be read from here."""
    try:
        process = psutil.Process(pid)
        connections = getattr(process, "net_connections", None) or process.connections
        found = connections(kind="tcp")
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    return any(
        c.status == psutil.CONN_LISTEN
        and c.laddr
        and c.laddr.port == listen.port
        and overlaps(str(c.laddr.ip), listen.host)
        for c in found
    )


WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def overlaps(bound: str, host: str) -> bool:
    """Whether a socket bound to address `bound` keeps one at `host` (same port) from binding."""
    if bound in WILDCARDS or host in WILDCARDS or bound == host:
        return True
    try:
        address = ipaddress.ip_address(bound.split("%")[0])
    except ValueError:
        return False
    if host == "localhost":
        return address.is_loopback
    try:
        return address == ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: not resolved here; the bind said it is in use
