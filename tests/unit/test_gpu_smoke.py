"""contrib/gpu-smoke.sh, as far as a host without a GPU can check it: the plan, the config it
would serve (valid, and shaped so that evictions sleep and wake), usage errors, shellcheck."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from vllmd.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "contrib" / "gpu-smoke.sh"
BEGIN, END = "----- config (vllmd.toml) -----", "----- end of config -----"
MiB = 2**20


def which(tool: str) -> str:
    found = shutil.which(tool)
    assert found is not None, f"{tool} is needed by this test (Debian package {tool})"
    return found


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Without the caller's SMOKE_* settings, so that the defaults are what is tested.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SMOKE_")}
    return subprocess.run(
        [which("bash"), str(SCRIPT), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def config_of(output: str, tmp_path: Path) -> Path:
    assert BEGIN in output and END in output
    text = output.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    path = tmp_path / "vllmd.toml"
    path.write_text(text)
    return path


def test_dry_run_prints_the_plan_and_a_config_that_passes_check_config(tmp_path: Path) -> None:
    done = run("--dry-run")

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    for expectation in (
        "R + 64 MiB",
        "<= 25 % of R",
        "learned overhead",
        "<= 1/3 of",
        "within 1024 MiB",
    ):
        assert expectation in done.stdout
    path = config_of(done.stdout, tmp_path)
    check = subprocess.run(
        [sys.executable, "-m", "vllmd.cli.entry", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == f"{path}: ok"


def test_dry_run_config_makes_evictions_sleep_and_wake_on_gpu_0(tmp_path: Path) -> None:
    """The budget fits one reservation plus an assumed residue, never two reservations."""
    config = load_config(config_of(run("--dry-run").stdout, tmp_path))

    models = config.models
    assert {m.model for m in models.values()} == {
        "Qwen/Qwen2.5-0.5B-Instruct",
        "HuggingFaceTB/SmolLM2-360M-Instruct",
    }
    assert {name: m.sleep_level for name, m in models.items()} == {
        "smoke-a0": 0,
        "smoke-a": 1,
        "smoke-b": 2,
    }
    assert all(m.devices == ("0",) and m.memory == 6 * 1024 * MiB for m in models.values())
    sched = config.scheduler
    assert (sched.evict_to, sched.min_residency, config.engine.transport) == ("sleep", 0, "uds")
    assert config.engine.command == ("vllm", "serve")
    budget = config.devices["0"]
    assert budget.kind == "gpu" and budget.uuid is None and budget.memory is not None
    usable = budget.memory - sched.headroom
    reservation = 6 * 1024 * MiB
    assert reservation + sched.sleep_residue <= usable < 2 * reservation
    assert config.daemon.state_dir == tmp_path / "state"  # relative: next to the config


def test_flags_and_environment_override_the_defaults(tmp_path: Path) -> None:
    done = run(
        "--dry-run",
        "--model-b",
        "org/other",
        "--reservation=8192MiB",
        "--engine",
        'python -m vllm.entrypoints.openai.api_server --x "q"',
        "--port=18500",
        env={"SMOKE_MODEL_A": "org/first", "SMOKE_MAX_MODEL_LEN": "512"},
    )

    assert done.returncode == 0, done.stderr
    config = load_config(config_of(done.stdout, tmp_path))
    assert config.models["smoke-a"].model == "org/first"
    assert config.models["smoke-b"].model == "org/other"
    assert config.models["smoke-b"].memory == 8 * 1024 * MiB
    assert config.models["smoke-b"].max_model_len == 512
    assert config.gateway.listen.port == 18500
    assert config.engine.command == (
        "python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--x",
        '"q"',  # split on blanks, no shell quoting: the quotes are the argument's own
    )


def test_usage_errors_exit_2_and_say_why() -> None:
    cases = {
        ("--bogus",): "unknown argument: --bogus",
        ("--dry-run=yes",): "unknown argument: yes",
        ("--reservation", "6G"): '"6G" is not a size',
        ("--reservation", "512MiB"): "at least 1024MiB",
        ("--port", "http"): '"http" is not a port',
        ("--model-a",): "--model-a needs a value",
        ("--max-model-len", "0"): "not a number",
    }
    for args, message in cases.items():
        done = run(*args)
        assert done.returncode == 2, args
        assert message in done.stderr, (args, done.stderr)
        assert done.stdout == ""


def test_help_exits_0() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert "--dry-run" in done.stdout and "SMOKE_RESERVATION" in done.stdout


def test_real_run_without_the_tools_fails_its_preflight_and_touches_nothing(
    tmp_path: Path,
) -> None:
    """A PATH without nvidia-smi or vllmd: one FAIL line, exit 1, no work directory made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("curl", "ps", "awk", "python3"):
        (bin_dir / tool).symlink_to(which(tool))
    done = run(env={"PATH": str(bin_dir), "VLLMD": "vllmd", "TMPDIR": str(tmp_path)})

    assert done.returncode == 1
    fails = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == ["FAIL preflight: not found: nvidia-smi vllmd (this script installs nothing)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_shellcheck_finds_nothing() -> None:
    done = subprocess.run(
        [which("shellcheck"), str(SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout


def test_script_is_executable_bash() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert re.match(r"#!/usr/bin/env bash\n", SCRIPT.read_text())
