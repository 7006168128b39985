"""The SOA serial only grows: Unix time, or previous + 1 when that is larger."""

from __future__ import annotations

import itertools

import pytest

from atlasd.dns.zone import MAX_SERIAL, SerialError, next_serial, parse_serial

NOW = 1_764_000_000.7


@pytest.mark.parametrize(
    ("previous", "now", "expected"),
    [
        (None, NOW, 1_764_000_000),  # first run: the clock
        (1_000, NOW, 1_764_000_000),  # old serial far behind: jump to the clock
        (1_764_000_000, NOW, 1_764_000_001),  # same second: +1
        (1_764_000_500, NOW, 1_764_000_501),  # burst ran ahead of the clock: keep counting
        (1_764_000_500, 1_700_000_000.0, 1_764_000_501),  # clock stepped back: still grows
        (2_026_112_400, NOW, 2_026_112_401),  # an adopted YYYYMMDDnn serial keeps growing
        (0, 0.0, 1),
    ],
)
def test_next_serial(previous: int | None, now: float, expected: int) -> None:
    assert next_serial(previous, now=now) == expected


def test_serial_grows_over_many_changes() -> None:
    serial: int | None = None
    seen: list[int] = []
    for i in range(1000):
        serial = next_serial(serial, now=NOW + i / 100)
        seen.append(serial)
    assert all(b > a for a, b in itertools.pairwise(seen))


@pytest.mark.parametrize("previous", [MAX_SERIAL, MAX_SERIAL + 1, -1])
def test_serial_refuses_to_wrap(previous: int) -> None:
    with pytest.raises(SerialError):
        next_serial(previous, now=NOW)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$ORIGIN atlas.\natlas. 60 IN SOA ns. host. 42 7200 3600 1209600 30\n", 42),
        ("@ IN SOA ns.atlas. hostmaster.atlas. (\n  2017042745 ; serial\n 7200 )\n", 2017042745),
        ("@ 3600 IN SOA a. b. ( 5 1 2 3 4 )", 5),
        ("; no soa here\n", None),
        ("", None),
    ],
)
def test_parse_serial(text: str, expected: int | None) -> None:
    assert parse_serial(text) == expected


def test_parse_serial_refuses_overflow() -> None:
    with pytest.raises(SerialError):
        parse_serial(f"atlas. 60 IN SOA a. b. {MAX_SERIAL + 1} 1 2 3 4\n")
