"""The `vllmd` console script: what must be done before the daemon's modules are imported,
then the daemon's command line (vllmd.cli.vllmd, whose import has no side effects).

    python -m vllmd.cli.entry serve --config etc/demo.toml   # as the console script runs it
"""

from __future__ import annotations

import gc
import sys

# Optional extras the daemon never uses, kept out of its process: structlog imports rich when
# it is installed (vLLM brings it) for tracebacks the daemon renders itself (format_exc_info,
# plain text for journald), and httpx its command line (click, pygments, rich). Each import
# then fails as if the package were absent, which both handle; the start-up and memory this
# saves are in docs/performance.md "Start-up".
EXTRAS = ("rich", "click", "pygments")


def prepare() -> None:
    """Before the daemon's modules are imported: the extras kept out, and the collector off.
    Importing the daemon makes tens of thousands of objects that live as long as it does;
    collecting among them finds almost nothing. `serve` freezes what start-up made and turns
    the collector on again; `check-config` turns it on at once."""
    for extra in EXTRAS:
        sys.modules.setdefault(extra, None)  # type: ignore[arg-type]  # None: "not installed"
    gc.disable()


def vllmd() -> int:
    prepare()
    from vllmd.cli.vllmd import main

    return main()


if __name__ == "__main__":
    sys.exit(vllmd())
