"""Map- and set-valued fields in the daemon's log: JSON objects and arrays in the JSON log
(journald, files), JSON in the console too, never Python reprs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
import structlog

from vllmd import log

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    try:
        yield
    finally:
        structlog.reset_defaults()


def test_json_log_writes_a_map_field_as_a_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "json")
    structlog.get_logger("vllmd.test").info("evicting", frees_bytes={"cpu0": 3221225472})
    line = json.loads(capsys.readouterr().err)
    assert line["frees_bytes"] == {"cpu0": 3221225472}


def test_json_log_writes_read_only_maps_sets_and_paths_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A MappingProxyType came out as the string "mappingproxy({'cpu0': 1})", a frozenset as
    "frozenset({3})"."""
    log.configure("info", "json")
    structlog.get_logger("vllmd.test").info(
        "x",
        frees_bytes=MappingProxyType({"cpu0": 1}),
        pids=frozenset({3, 1}),
        path=Path("a/b"),
    )
    line = json.loads(capsys.readouterr().err)
    assert line["frees_bytes"] == {"cpu0": 1}
    assert line["pids"] == [1, 3]
    assert line["path"] == "a/b"


def test_console_log_writes_a_map_field_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "console")
    structlog.get_logger("vllmd.test").info(
        "evicting", frees_bytes={"cpu0": 3221225472}, names=["a", "b"], reason="lru"
    )
    text = ANSI.sub("", capsys.readouterr().err)
    assert 'frees_bytes={"cpu0": 3221225472}' in text
    assert 'names=["a", "b"]' in text
    assert "reason=lru" in text
