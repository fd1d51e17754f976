"""The daemon's process keeps out what it never uses: optional extras (rich, click, pygments,
which structlog and httpx would import when installed) and the engine's stack (vllm, torch),
and still logs a traceback in console and JSON form without them. Until READY it also does
without what only an engine, an alert, a control call or a reload needs (start-up time)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
import vllmd.cli.entry
vllmd.cli.entry.prepare()  # as the console script does, before the daemon's imports
import vllmd.cli.vllmd
from vllmd.log import configure
import structlog
configure("info", sys.argv[1])
try:
    raise ValueError("probe")
except ValueError:
    structlog.get_logger("t").exception("failed")
loaded = [m for m in ("rich", "click", "pygments", "uvicorn", "vllm", "torch")
          if sys.modules.get(m) is not None]
print("LOADED " + " ".join(loaded), file=sys.stdout)
"""


def _probe(fmt: str) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, fmt], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout, done.stderr


def test_the_daemon_imports_no_optional_extras_and_no_engine_stack() -> None:
    out, _ = _probe("json")
    assert out.strip() == "LOADED"


def test_importing_the_daemons_command_line_changes_nothing() -> None:
    """vllmd.cli.vllmd has no import-time side effects: the collector stays on and the
    extras importable; only the console script's entry module (vllmd.cli.entry) changes
    them, before the daemon's modules are imported."""
    kept_out = "sorted(m for m in ('rich', 'click', 'pygments') if sys.modules.get(m, 1) is None)"
    plain = f"import gc, sys\nimport vllmd.cli.vllmd\nprint(gc.isenabled(), {kept_out})\n"
    entry = (
        "import gc, sys\nimport vllmd.cli.entry\nvllmd.cli.entry.prepare()\n"
        f"import vllmd.cli.vllmd\nprint(gc.isenabled(), {kept_out})\n"
    )
    answers = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
        for code in (plain, entry)
    ]
    assert answers == ["True []", "False ['click', 'pygments', 'rich']"]


def test_the_console_script_is_the_entry_module() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["vllmd"] == "vllmd.cli.entry:vllmd"


def test_tracebacks_are_still_logged_without_rich() -> None:
    _, console = _probe("console")
    assert "failed" in console and "ValueError: probe" in console
    assert "Traceback (most recent call last)" in console
    _, lines = _probe("json")
    record = json.loads(lines.strip().splitlines()[-1])
    assert record["event"] == "failed" and "ValueError: probe" in record["exception"]


READY_PROBE = """
import sys
import vllmd.cli.entry
vllmd.cli.entry.prepare()  # as the console script does, before the daemon's imports
import vllmd.cli.vllmd
import anyio
from pathlib import Path
from vllmd.config import load_config
from vllmd.daemon import serve
from vllmd.log import configure

configure("warning", "json")
config = load_config(Path(sys.argv[1]))

async def main() -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(serve, config, stop.wait)
        print("LOADED " + " ".join(m for m in sys.argv[2:] if m in sys.modules))
        stop.set()

anyio.run(main, backend_options={"use_uvloop": True})
"""

# Each was imported (or, for httpcore, an SSL context built) before READY at ~5-70 ms each.
NOT_BEFORE_READY = {
    "httpcore": "an httpx client: the alert notifier's is made at its first post",
    "httpx": "engines' and Alertmanager's client: at the first spawn or alert (the proxy's "
    "upstream pool has errors of its own)",
    "psutil": "process trees and RSS: only once an engine runs",
    "h11": "the control API's protocol: at its first connection",
    "vllmd.control.connection": "the control API's protocol: at its first connection",
    "vllmd.config.diff": "a reload's plan: at the first reload",
    "difflib": "did-you-mean for an unknown config key",
}


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_vllmd_serve_is_ready_without_what_only_later_work_needs(tmp_path: Path) -> None:
    config = tmp_path / "vllmd.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
control_socket = "{tmp_path / "ctl.sock"}"
[gateway]
listen = "127.0.0.1:0"
[devices.cpu0]
kind = "cpu"
memory = "64GiB"
[models.a]
model = "fake/a"
devices = ["cpu0"]
memory = "3GiB"
"""
    )
    watched = [*NOT_BEFORE_READY, "pynvml"]
    done = subprocess.run(
        [sys.executable, "-c", READY_PROBE, str(config), *watched],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED"))
    loaded = set(line.split()[1:])
    if _driver_present():
        loaded.discard("pynvml")  # with a driver, the probe reads the GPUs through it
    assert not loaded, {m: NOT_BEFORE_READY.get(m, "NVML without a driver") for m in loaded}
