"""atlasd.addresses over generated addresses: an IPv4 address and every IPv6 form that
carries it get the same verdict; the judgement never raises anything but AddressError,
and its canonical text judges the same again."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from atlasd.addresses import AddressError, check_remote_address
from tests.property.profile import examples
from tests.property.report import RESULTS
from tests.property.services import HOSTILE_IPS, VALID_IPS, carrying_forms

COUNTS: dict[str, int] = {"examples": 0, "refused": 0}


def verdict(value: Any, allow_loopback: bool) -> str | None:
    """The canonical text, or None when refused."""
    try:
        return check_remote_address(value, allow_loopback=allow_loopback)
    except AddressError:
        return None


@settings(max_examples=examples(2000))
@given(v4=st.ip_addresses(v=4), allow_loopback=st.booleans())
@example(v4=ipaddress.IPv4Address("127.0.0.1"), allow_loopback=False)  # the bypasses
@example(v4=ipaddress.IPv4Address("169.254.169.254"), allow_loopback=True)
@example(v4=ipaddress.IPv4Address("0.0.0.1"), allow_loopback=True)  # ::0.0.0.1 is ::1
def test_a_carried_ipv4_is_judged_as_itself(
    v4: ipaddress.IPv4Address, allow_loopback: bool
) -> None:
    plain = verdict(str(v4), allow_loopback)
    COUNTS["examples"] += 1
    COUNTS["refused"] += plain is None
    for form in carrying_forms(v4):
        carried = verdict(form, allow_loopback)
        if plain is None:
            assert carried is None, (form, carried)
    # IPv4-mapped is the IPv4 host itself: the very same verdict and text.
    assert verdict(f"::ffff:{v4}", allow_loopback) == plain
    RESULTS["addresses"] = dict(COUNTS)


@settings(max_examples=examples(2000))
@given(value=st.one_of(VALID_IPS, HOSTILE_IPS, st.ip_addresses().map(str)))
def test_judgement_is_total_and_idempotent(value: Any) -> None:
    for allow_loopback in (False, True):
        text = verdict(value, allow_loopback)
        if text is not None:
            assert verdict(text, allow_loopback) == text
            assert str(ipaddress.ip_address(text)) == text
