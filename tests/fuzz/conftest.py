"""Hypothesis profiles for the fuzz tests, and one daemon per test module.

`suite` (the default) is short and derandomized, so CI runs the same examples every time;
`long` (`HYPOTHESIS_PROFILE=long`, or any `VLLMD_FUZZ_EXAMPLES`) is for `make fuzz`: random,
`VLLMD_FUZZ_EXAMPLES` examples per target (20000 unless set), no per-test timeout. Neither
keeps a database of examples: nothing is written into the work tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

SUITE_EXAMPLES = 100
LONG_EXAMPLES = 20_000

_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# No explain phase: re-running a shrunk failure dozens of times against a daemon took minutes
# (a long run spent 270 s there) and says little the failing example does not.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
settings.register_profile(
    "suite",
    max_examples=SUITE_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    phases=_PHASES,
    suppress_health_check=_CHECKS,
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("VLLMD_FUZZ_EXAMPLES") or LONG_EXAMPLES),
    deadline=None,
    database=None,
    print_blob=True,
    phases=_PHASES,
    suppress_health_check=_CHECKS,
)


def _profile() -> str:
    if os.environ.get("VLLMD_FUZZ_EXAMPLES"):
        return "long"
    return os.environ.get("HYPOTHESIS_PROFILE", "suite")


PROFILE = _profile()
settings.load_profile(PROFILE)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module-scoped, so that one daemon (a module-scoped async fixture) serves every
    example of a module."""
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A long run goes on past the suite's per-test timeout."""
    if PROFILE != "long":
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(0))
