from __future__ import annotations

import pytest

from vllmd.units import format_duration, format_size, parse_duration, parse_size

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GiB", 20 * GiB),
        ("20GB", 20 * 10**9),
        ("512MiB", 512 * 1024**2),
        ("1.5GiB", 3 * GiB // 2),
        ("4KiB", 4096),
        ("2TB", 2 * 10**12),
        ("1TiB", 1024**4),
        ("1KB", 1000),
        ("100B", 100),
        ("0", 0),
        ("1024", 1024),
        ("20gib", 20 * GiB),
        ("20 GiB", 20 * GiB),
    ],
)
def test_size_accepts_iec_si_and_plain_bytes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_size_accepts_an_integer_as_bytes() -> None:
    assert parse_size(4096) == 4096


def test_size_drops_fractions_of_a_byte() -> None:
    assert parse_size("1.3KiB") == 1331


@pytest.mark.parametrize(
    "text", ["20 G", "20G", "", "GiB", "-1GiB", "1.2.3GiB", "twenty", "1 Gb/s"]
)
def test_bad_size_is_named_with_examples(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f'"{text}" is not a size (e.g. "20GiB", "20GB")'


@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_size_rejects_negative_bool_and_float(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", 90.0),
        ("1h30m", 5400.0),
        ("0s", 0.0),
        ("0", 0.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2m30s", 150.0),
        ("10m", 600.0),
        ("250us", 0.00025),
        ("1µs", 0.000001),
        ("100ns", 1e-7),
        (".5s", 0.5),
        ("30d", 30 * 86400.0),  # days, beyond Go: retention periods
    ],
)
def test_duration_uses_go_syntax(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["5 minutes", "90", "", "1w", "-5s", "1h 30m", "s", "1.5"])
def test_bad_duration_is_named_with_examples(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f'"{text}" is not a duration (e.g. "90s", "1h30m")'


def test_duration_rejects_a_number() -> None:
    with pytest.raises(ValueError):
        parse_duration(90)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "expected"),
    [(3 * GiB, "3.0GiB"), (512, "512B"), (0, "0B"), (1536, "1.5KiB"), (5 * 1024**4, "5.0TiB")],
)
def test_format_size_uses_the_largest_iec_unit(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(5400, "1h30m"), (90, "1m30s"), (0, "0s"), (0.5, "500ms"), (3600, "1h"), (1.5, "1.5s")],
)
def test_format_duration_is_go_syntax(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("seconds", [0, 0.25, 1, 59.5, 61, 3599, 3600, 86400 + 61.5])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
