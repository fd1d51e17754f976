"""The daemon's process keeps out what it never uses: optional extras (rich, click, pygments,
which structlog and httpx would import when installed) and the engine's stack (vllm, torch),
and still logs a traceback in console and JSON form without them."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import sys
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


def test_tracebacks_are_still_logged_without_rich() -> None:
    _, console = _probe("console")
    assert "failed" in console and "ValueError: probe" in console
    assert "Traceback (most recent call last)" in console
    _, lines = _probe("json")
    record = json.loads(lines.strip().splitlines()[-1])
    assert record["event"] == "failed" and "ValueError: probe" in record["exception"]
