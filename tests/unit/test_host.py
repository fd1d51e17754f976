"""The host's RAM and CPU use, read without psutil: the same figures psutil reports."""

from __future__ import annotations

from pathlib import Path

import psutil

from vllmd.devices.host import CpuUse, host_memory_total

# user nice system idle iowait irq softirq steal guest guest_nice
FIRST = "cpu  100 0 50 800 50 0 0 0 10 0\ncpu0 50 0 25 400 25 0 0 0 5 0\n"


def _reading(stat: Path, line: str) -> None:
    stat.write_text(line)


def test_host_memory_total_is_what_psutil_reports() -> None:
    assert host_memory_total() == psutil.virtual_memory().total


def test_cpu_use_is_busy_over_total_ticks_since_the_last_reading(tmp_path: Path) -> None:
    """Guest time is inside user time (not counted twice); idle and iowait are not busy."""
    stat = tmp_path / "stat"
    use = CpuUse(stat)
    _reading(stat, FIRST)
    assert use.read() is None  # nothing to compare with yet
    # +100 user (10 of it guest), +50 system, +100 idle, +50 iowait: 150 busy of 300.
    _reading(stat, "cpu  200 0 100 900 100 0 0 0 20 0\n")
    assert use.read() == 0.5


def test_cpu_use_of_counters_that_went_back_or_did_not_move(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    use = CpuUse(stat)
    _reading(stat, FIRST)
    use.read()
    assert use.read() == 0.0  # no tick between the readings
    # idle went back (a kernel quirk psutil clamps too): counted as 0, not negative.
    _reading(stat, "cpu  200 0 50 700 50 0 0 0 10 0\n")
    assert use.read() == 1.0


def test_cpu_use_of_this_host_is_a_fraction() -> None:
    use = CpuUse()
    use.read()
    sum(range(100_000))
    value = use.read()
    assert value is not None and 0.0 <= value <= 1.0


def test_host_memory_total_is_meminfos_even_where_it_is_virtualised(tmp_path: Path) -> None:
    """Regression: sysconf's page count is the whole host's RAM inside a container whose
    /proc/meminfo (lxcfs) shows the container's; psutil, and the budget, go by the file."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_bytes(b"MemTotal:        8388608 kB\nMemFree:         1024 kB\n")
    assert host_memory_total(meminfo) == 8 * 2**30
    assert host_memory_total(tmp_path / "missing") > 0  # sysconf's, when it cannot be read
