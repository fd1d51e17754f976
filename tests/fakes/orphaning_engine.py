"""The fake engine, after leaving behind what vLLM's Worker leaves: a dead process of the
engine's process group that only later becomes a child of the daemon.

Run as ``python tests/fakes/orphaning_engine.py [vLLM flags]`` (then it becomes
fake_engine.py, same pid, same flags and FAKE_* variables). Before that:

    engine leader (this script)
    └── middle: exits at once, so the lingerer re-parents to the daemon (the subreaper)
        └── lingerer: forks a child that exits at once (a zombie in the engine's group), leaves
            the group (setsid), drops VLLMD_INSTANCE from its environment (vLLM's renamed
            processes overwrite theirs), waits until ORPHAN_RELEASE_FILE exists and exits
            without waiting for its child. Only then is the zombie handed to the daemon.

The daemon cannot see the lingerer (not in the engine's tree, group or environment), so it
survives the engine's stop and hands the zombie over afterwards, as vLLM's EngineCore does.

  ORPHAN_PIDS_FILE     written (atomically) with "<pid> zombie" and "<pid> lingerer" lines,
                       before the engine starts.
  ORPHAN_RELEASE_FILE  the lingerer exits once this exists (at the latest after 60 s).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"
MARKER_ENV = "VLLMD_INSTANCE"


def linger(zombie: int, pids_file: str, release_file: str) -> None:
    """The lingerer, re-executed with a clean environment; `zombie` is its dead child."""
    with open(pids_file + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{zombie} zombie\n{os.getpid()} lingerer\n")
    os.replace(pids_file + ".tmp", pids_file)
    deadline = time.monotonic() + 60
    while not os.path.exists(release_file) and time.monotonic() < deadline:
        time.sleep(0.02)
    os._exit(0)


def leave_a_lingerer(pids_file: str, release_file: str) -> None:
    middle = os.fork()
    if middle:
        os.waitpid(middle, 0)
        return
    if os.fork():
        os._exit(0)  # the middle: its child is now an orphan
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    os.setsid()
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    argv = [sys.executable, __file__, "--linger", str(zombie), pids_file, release_file]
    os.execve(sys.executable, argv, env)


def main() -> None:
    if sys.argv[1:2] == ["--linger"]:
        linger(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    pids_file = os.environ["ORPHAN_PIDS_FILE"]
    leave_a_lingerer(pids_file, os.environ["ORPHAN_RELEASE_FILE"])
    deadline = time.monotonic() + 30
    while not os.path.exists(pids_file) and time.monotonic() < deadline:
        time.sleep(0.01)  # the daemon must not see the lingerer before it hid
    os.execv(sys.executable, [sys.executable, str(FAKE_ENGINE), *sys.argv[1:]])


if __name__ == "__main__":
    main()
