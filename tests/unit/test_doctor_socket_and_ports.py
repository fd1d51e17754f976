"""doctor's socket comes from the config it checks (the flag and $VLLMD_SOCKET first); a port
in use is a PASS only when the daemon doctor reached holds it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vllmd.cli.client import DEFAULT_SOCKET, socket_for
from vllmd.cli.doctor import config_socket
from vllmd.cli.ports import listens_on, overlaps, port_checks
from vllmd.cli.vllmctl import parser, socket_path
from vllmd.config import Config, Listen, load_config

NO_SUCH_PID = 2**22 + 12345  # above pid_max's limit: its sockets cannot be read


def test_config_socket_resolves_a_relative_path_against_the_files_directory(
    tmp_path: Path,
) -> None:
    """As etc/demo.toml says it: `control_socket = "../.demo/control.sock"`."""
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "demo.toml"
    config.write_text('[daemon]\ncontrol_socket = "../.demo/control.sock"\n')
    found = config_socket(config)
    assert found is not None
    assert Path(os.path.normpath(found)) == tmp_path / ".demo" / "control.sock"


def test_config_socket_is_read_from_a_config_with_problems_elsewhere(tmp_path: Path) -> None:
    config = tmp_path / "vllmd.toml"
    config.write_text('[daemon]\ncontrol_socket = "/srv/ctl.sock"\n[models.a]\nmemory = 3\n')
    assert config_socket(config) == Path("/srv/ctl.sock")


def test_config_socket_of_a_file_without_one_is_the_default_and_of_no_file_none(
    tmp_path: Path,
) -> None:
    config = tmp_path / "vllmd.toml"
    config.write_text("[gateway]\n")
    assert config_socket(config) == DEFAULT_SOCKET
    assert config_socket(tmp_path / "missing.toml") is None
    (tmp_path / "bad.toml").write_text("[daemon\n")
    assert config_socket(tmp_path / "bad.toml") is None


def test_socket_rule_is_flag_then_environment_then_config_then_default() -> None:
    flag, env, configured = Path("/a.sock"), {"VLLMD_SOCKET": "/b.sock"}, Path("/c.sock")
    assert socket_for(flag, env, configured) == flag
    assert socket_for(None, env, configured) == Path("/b.sock")
    assert socket_for(None, {}, configured) == configured
    assert socket_for(None, {"VLLMD_SOCKET": ""}, None) == DEFAULT_SOCKET


def test_only_doctor_reads_the_configs_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLMD_SOCKET", raising=False)
    config = tmp_path / "vllmd.toml"
    config.write_text('[daemon]\ncontrol_socket = "ctl.sock"\n')
    doctor = parser().parse_args(["doctor", "--config", str(config)])
    assert socket_path(doctor) == tmp_path / "ctl.sock"
    flagged = parser().parse_args(["--socket", "/x.sock", "doctor", "--config", str(config)])
    assert socket_path(flagged) == Path("/x.sock")
    assert socket_path(parser().parse_args(["ps"])) == DEFAULT_SOCKET


@pytest.mark.parametrize(
    ("bound", "host", "clash"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", True),
        ("127.0.0.1", "0.0.0.0", True),
        ("::", "::1", True),
        ("127.0.0.1", "localhost", True),
        ("127.0.0.1", "10.0.0.5", False),
        ("10.0.0.5", "localhost", False),
    ],
)
def test_listen_addresses_clash_when_equal_or_either_is_a_wildcard(
    bound: str, host: str, clash: bool
) -> None:
    assert overlaps(bound, host) is clash


def test_listens_on_sees_a_processs_listening_socket() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert listens_on(os.getpid(), Listen("127.0.0.1", port)) is True
        assert (
            listens_on(os.getpid(), Listen("127.0.0.1", port + 1 if port < 65535 else 1)) is False
        )


def test_listens_on_a_process_that_does_not_exist_cannot_tell() -> None:
    assert listens_on(NO_SUCH_PID, Listen("127.0.0.1", 8000)) is None


def _config_with_port(tmp_path: Path, port: int) -> Config:
    path = tmp_path / "vllmd.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "state"\ncontrol_socket = "ctl.sock"\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\n'
    )
    return load_config(path)


@pytest.mark.parametrize(("same_config", "status"), [(True, "PASS"), (False, "WARN")])
def test_a_port_in_use_where_the_daemons_sockets_are_unreadable_passes_only_for_its_config(
    tmp_path: Path, same_config: bool, status: str
) -> None:
    """Another uid's daemon: its config's port is taken to be its own; another file's is not
    known to be."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        config = _config_with_port(tmp_path, held.getsockname()[1])
        runs = str(config.path) if same_config else "/etc/vllmd/vllmd.toml"
        (check,) = port_checks(config, {"pid": NO_SUCH_PID, "config_path": runs})
    assert (check.name, check.status) == ("gateway port", status)
    assert f"pid {NO_SUCH_PID}" in check.detail


def test_a_port_in_use_with_the_daemon_down_fails(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        (check,) = port_checks(_config_with_port(tmp_path, held.getsockname()[1]), None)
    assert check.status == "FAIL"
