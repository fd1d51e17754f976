"""Config files written for a test and checked as `vllmd check-config` checks them."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.fake_pynvml import FakeNvml
from vllmd.config import check_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vllmd.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """Every problem of the file `text`, on a host without GPUs: the host's own (if any) must
    not change what the tests see."""
    return check_config(write(tmp_path, text), nvml=FakeNvml())
