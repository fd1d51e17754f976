"""The fake engine, with a child that left the engine's process group, as a vLLM process may.

Run as ``python tests/fakes/escaping_engine.py [vLLM flags]`` (then it becomes fake_engine.py,
same pid, same flags and FAKE_* variables). Before that it starts a child in a session of its
own (so in no group of the engine's), without VLLMD_INSTANCE in its environment (vLLM's renamed
processes overwrite theirs), holding host memory and sleeping. The child stays the engine's
child: the daemon sees it in the engine's process tree while the engine runs, yet nothing of
the engine's group, nor its environment, names it after the daemon is gone.

  ESCAPED_PID_FILE    written (atomically) with the child's pid, before the engine starts.
  ESCAPED_HOLD_BYTES  host memory the child holds, touched (default 16 MiB).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"
MARKER_ENV = "VLLMD_INSTANCE"
HOLDER = "import os, time; held = b'\\x01' * int(os.environ['HOLD']); time.sleep(3600)"


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    env["HOLD"] = os.environ.get("ESCAPED_HOLD_BYTES", str(16 * 2**20))
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = os.environ["ESCAPED_PID_FILE"]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{child.pid}\n")
    os.replace(path + ".tmp", path)
    os.execv(sys.executable, [sys.executable, str(FAKE_ENGINE), *sys.argv[1:]])


if __name__ == "__main__":
    main()
