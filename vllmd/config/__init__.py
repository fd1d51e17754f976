"""vllmd's config: the TOML schema of docs/design.md as frozen dataclasses, validated at load.

load.py      load_config / parse_config / check_config
hardware.py  checks against this host's devices (NVML), apart from parsing
schema.py    the dataclasses
reader.py    typed reads of one table that collect problems
sections.py  [daemon] [gateway] [metrics] [engine] [scheduler]
models.py    [devices.X] [models.X] and the checks across them
alerts.py    [alerts], default rules, [[alerts.rules]] merged by name
"""

from vllmd.config.alerts import DEFAULT_RULES, OPS, SIGNALS
from vllmd.config.hardware import check_devices, device_problems, read_devices
from vllmd.config.load import check_config, load_config, parse_config
from vllmd.config.models import ENGINE_OWNED_FLAGS
from vllmd.config.schema import (
    AlertRule,
    AlertsConfig,
    Config,
    DaemonConfig,
    DeviceConfig,
    EngineConfig,
    GatewayConfig,
    Listen,
    MetricsConfig,
    ModelConfig,
    SchedulerConfig,
)
from vllmd.config.sections import parse_listen

__all__ = [
    "DEFAULT_RULES",
    "ENGINE_OWNED_FLAGS",
    "OPS",
    "SIGNALS",
    "AlertRule",
    "AlertsConfig",
    "Config",
    "DaemonConfig",
    "DeviceConfig",
    "EngineConfig",
    "GatewayConfig",
    "Listen",
    "MetricsConfig",
    "ModelConfig",
    "SchedulerConfig",
    "check_config",
    "check_devices",
    "device_problems",
    "load_config",
    "parse_config",
    "parse_listen",
    "read_devices",
]
