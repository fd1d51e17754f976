"""The validated config: frozen dataclasses, one per TOML table (see docs/design.md "Config")."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from vllmd.sizing import Sizing


def _no_entries() -> Mapping[str, str]:
    return MappingProxyType({})


# NCCL's buffers and custom all-reduce's IPC handles, per GPU, when an engine spans several
# GPUs (tensor parallel): added to engine.gpu_overhead until a start measured the model's own.
TP_OVERHEAD = 512 * 1024**2


@dataclass(frozen=True, slots=True)
class Listen:
    """A TCP listen address; `host` is "0.0.0.0" when the config said ":PORT"."""

    host: str
    port: int

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: assume it is reachable from elsewhere

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    state_dir: Path = Path("/var/lib/vllmd")
    control_socket: Path = Path("/run/vllmd/control.sock")
    control_socket_mode: int = 0o660
    control_socket_group: str = ""
    control_allow_uids: tuple[int, ...] = ()
    log_level: str = "info"
    event_retention: float = 30 * 86400.0  # seconds the state store keeps events


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: Listen = Listen("127.0.0.1", 8000)
    # Inline keys and the lines of api_keys_file, merged. Never log or echo these.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: Path | None = None
    allow_unauthenticated: bool = False
    max_body: int = 32 * 1024**2
    # Longest pause between two reads of a request body (nginx's client_body_timeout): 408.
    client_body_timeout: float = 10.0
    max_connections: int = 1024
    queue_timeout: float = 300.0
    max_queue: int = 256
    max_queue_total: int = 4096
    upstream_connect_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Listen | None = None  # None: served on the gateway


@dataclass(frozen=True, slots=True)
class EngineConfig:
    command: tuple[str, ...] = ("vllm", "serve")
    model_flag: str = ""
    transport: Literal["uds", "tcp"] = "uds"
    port_range: tuple[int, int] = (18000, 18999)
    startup_timeout: float = 900.0
    stop_timeout: float = 30.0
    drain_timeout: float = 60.0
    health_interval: float = 5.0
    health_failures: int = 3
    max_concurrent_starts: int = 1
    # What vLLM allocates per GPU before it measures (CUDA context, NCCL, workspace): outside
    # --gpu-memory-utilization. The first start's estimate; later starts use the measured one.
    gpu_overhead: int = 1024**3
    env: Mapping[str, str] = field(default_factory=_no_entries, repr=False)

    def first_overhead(self, gpus: int) -> int:
        """What an engine on `gpus` GPUs is expected to allocate per GPU beyond its fraction
        before a start of its model has measured it: gpu_overhead, + TP_OVERHEAD across
        several GPUs. The config's check and placement/ledger.py `Ledger.overhead` both use it."""
        return self.gpu_overhead + TP_OVERHEAD if gpus > 1 else self.gpu_overhead


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    headroom: int = 1024**3
    min_residency: float = 60.0
    idle_ttl: float = 0.0
    evict_to: Literal["sleep", "stop"] = "sleep"
    host_memory: int = 0
    sleep_residue: int = 4 * 1024**3
    sleep_ttl: float = 3600.0


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    kind: Literal["cpu", "gpu"]
    memory: int | None = None  # None: measured (GPUs only)
    uuid: str | None = None
    cpus: tuple[int, ...] = ()  # cpu devices: the cores its engines get slices of


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    model: str  # HF id, or an absolute local path once resolved
    memory: int  # reservation per device; 0: "auto" that could not size the model yet
    aliases: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("0",)
    max_model_len: int | None = None
    dtype: str = "auto"
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=_no_entries, repr=False)
    pinned: bool = False
    preload: bool = False
    priority: int = 0
    idle_ttl: float | None = None  # None: scheduler.idle_ttl
    sleep_level: int = 1
    max_restarts: int = 5
    restart_window: float = 600.0
    kv_sequences: int = 1  # memory = "auto": full-length sequences the KV cache must hold
    cpus: int | None = None  # cores of its cpu device its engine gets (None: 1; 0: unbound)
    memory_auto: bool = False  # memory was "auto" (or left out): `memory` is `sizing`'s total
    sizing: Sizing | None = field(default=None, repr=False)
    unsized: str = ""  # memory = "auto" and the files are not there yet: why

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def cores(self) -> int:
        """How many cores of its cpu device the engine gets (0: no slice, none counted)."""
        return 1 if self.cpus is None else self.cpus


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    signal: str
    op: str
    threshold: float
    for_: float = 0.0
    window: float = 300.0
    min_requests: int = 0
    severity: str = "warning"
    model: str = ""  # "" = every model, one alert each
    device: str = ""  # "" = every device, one alert each
    labels: Mapping[str, str] = field(default_factory=_no_entries)
    annotations: Mapping[str, str] = field(default_factory=_no_entries)
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    enabled: bool = True
    interval: float = 15.0
    alertmanager: tuple[str, ...] = ()
    webhooks: tuple[str, ...] = ()
    resend: float = 60.0
    labels: Mapping[str, str] = field(default_factory=_no_entries)
    external_url: str = ""  # generatorURL of alerts; "" = http://FQDN:GATEWAY_PORT/v1/models
    rules: tuple[AlertRule, ...] = ()  # defaults merged with the user's; disabled ones dropped


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    daemon: DaemonConfig = DaemonConfig()
    gateway: GatewayConfig = GatewayConfig()
    metrics: MetricsConfig = MetricsConfig()
    engine: EngineConfig = EngineConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    devices: Mapping[str, DeviceConfig] = field(default_factory=lambda: MappingProxyType({}))
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: MappingProxyType({}))
    alerts: AlertsConfig = AlertsConfig()
    # Served name (name or alias) -> model, so the gateway's lookup per request is one dict get.
    _by_served_name: Mapping[str, ModelConfig] = field(
        init=False, repr=False, compare=False, default_factory=lambda: MappingProxyType({})
    )

    def __post_init__(self) -> None:
        by_name = {served: m for m in self.models.values() for served in m.served_names}
        object.__setattr__(self, "_by_served_name", MappingProxyType(by_name))

    def model_for(self, name_or_alias: str) -> ModelConfig | None:
        """The model served under `name_or_alias`, or None."""
        return self._by_served_name.get(name_or_alias)
