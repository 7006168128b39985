"""addresses: every IPv6 form that carries an IPv4 address is judged by that address."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from atlasd.addresses import (
    AddressError,
    check_remote_address,
    embedded_ipv4,
    is_ip_literal,
    parse_ip,
)
from atlasd.fleet.validate import validate_all, validate_cluster
from atlasd.kube.resources import SERVICES
from atlasd.model import Settings
from atlasd.standalone import FileStore
from tests.unit.reconcile.builders import cluster_service

# (address, words the refusal must contain). Each plain IPv4/IPv6 refusal is followed by
# the same address in every IPv6 form that carries an IPv4 address.
REFUSED: list[tuple[str, str]] = [
    # plain addresses
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("224.0.0.5", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "this network"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("4000::1", "reserved"),
    ("1::1.2.3.4", "reserved"),
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    # IPv4-mapped, RFC 4291 §2.5.5.2 (the issue's two bypasses first)
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254"),
    ("::ffff:7f00:1", "loopback"),
    ("::FFFF:127.0.0.1", "loopback"),
    ("0:0:0:0:0:ffff:127.0.0.1", "loopback"),
    ("::ffff:224.0.0.1", "multicast"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::ffff:255.255.255.255", "broadcast"),
    # IPv4-compatible, RFC 4291 §2.5.5.1
    ("::127.0.0.1", "IPv4-compatible 127.0.0.1"),
    ("::169.254.169.254", "metadata"),
    ("::0.0.0.2", "this network"),
    # IPv4-translated, RFC 2765 §2.1
    ("::ffff:0:127.0.0.1", "IPv4-translated 127.0.0.1"),
    ("::ffff:0:a9fe:a9fe", "link-local"),
    # NAT64 well-known prefix, RFC 6052
    ("64:ff9b::127.0.0.1", "NAT64 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "link-local"),
    ("64:ff9b::10.0.0.1", "RFC 6052 §3.1"),  # non-global behind the WKP
    ("64:ff9b:1::7f00:1", "RFC 8215"),  # local-use prefix: cannot be judged
    ("64:ff9b:1::c000:201", "RFC 8215"),
    # 6to4, RFC 3056
    ("2002:7f00:1::1", "6to4 127.0.0.1"),
    ("2002:a9fe:a9fe::", "link-local"),
    ("2002:e000:1::1", "multicast"),
    ("2002:a00:1::1", "not a global address"),
    # Teredo, RFC 4380 (client address inverted in the last 32 bits)
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo client 127.0.0.1"),
    ("2001:0:7f00:1::4136:e378", "Teredo server 127.0.0.1"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "link-local"),
    # ISATAP interface identifiers, RFC 5214 §6.1
    ("2001:db8::5efe:7f00:1", "ISATAP 127.0.0.1"),
    ("2001:db8::200:5efe:a9fe:a9fe", "link-local"),
    # not IP literals Envoy takes
    ("fe80::1%eth0", "zone index"),
    ("2001:db8::1%1", "zone index"),
    (" 192.0.2.1", "not an IP"),
    ("192.0.2.1\n", "not an IP"),
    ("192.0.2.01", "not an IP"),
    ("\u0661.\u0662.\u0663.\u0664", "not an IP"),
    ("1.2.3", "not an IP"),
    ("envoy.example.com", "not an IP"),
    ("", "not an IP"),
]

ACCEPTED: list[tuple[str, str]] = [
    ("192.0.2.10", "192.0.2.10"),
    ("10.1.2.3", "10.1.2.3"),  # private-use is allowed
    ("172.16.0.1", "172.16.0.1"),
    ("192.168.1.1", "192.168.1.1"),
    ("100.64.0.1", "100.64.0.1"),  # shared address space (CGN, Tailscale)
    ("8.8.8.8", "8.8.8.8"),
    ("2001:db8::1", "2001:db8::1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("fd12:3456::1", "fd12:3456::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),  # mapped: written back as the IPv4 it is
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("::10.0.0.1", "::a00:1"),
    ("::ffff:0:10.0.0.1", "::ffff:0:a00:1"),
    ("64:ff9b::8.8.8.8", "64:ff9b::808:808"),
    ("2002:808:808::1", "2002:808:808::1"),
    ("2001:0:808:808::f7f7:f7f7", "2001:0:808:808::f7f7:f7f7"),  # Teredo, 8.8.8.8 twice
    ("2001:db8::200:5efe:a00:1", "2001:db8::200:5efe:a00:1"),  # ISATAP, private is fine
]


@pytest.mark.parametrize(("address", "words"), REFUSED)
def test_refused(address: str, words: str) -> None:
    with pytest.raises(AddressError, match=words.replace(".", r"\.")) as info:
        check_remote_address(address)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("address", "canonical"), ACCEPTED)
def test_accepted(address: str, canonical: str) -> None:
    assert check_remote_address(address) == canonical


@pytest.mark.parametrize(
    ("address", "canonical"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("::ffff:127.0.0.1", "127.0.0.1")],
)
def test_allow_loopback_allows_every_spelling_of_loopback(address: str, canonical: str) -> None:
    assert check_remote_address(address, allow_loopback=True) == canonical


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "::ffff:169.254.169.254", "2002:7f00:1::1", "64:ff9b::127.0.0.1"],
)
def test_allow_loopback_allows_nothing_else(address: str) -> None:
    # 6to4 and NAT64 need a global IPv4 address: loopback behind them reaches nothing.
    with pytest.raises(AddressError):
        check_remote_address(address, allow_loopback=True)


def test_every_refused_plain_ipv4_is_refused_in_every_form() -> None:
    """The exhaustive cross product: each refused IPv4 address, in each carrying form."""
    forms = [
        lambda v4: f"::ffff:{v4}",
        lambda v4: f"::{v4}",
        lambda v4: f"::ffff:0:{v4}",
        lambda v4: f"64:ff9b::{v4}",
        lambda v4: str(ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80))),
        lambda v4: str(
            ipaddress.IPv6Address((0x20010000 << 96) | (0x8080808 << 64) | (int(v4) ^ 0xFFFFFFFF))
        ),
        lambda v4: str(ipaddress.IPv6Address((0x20010000 << 96) | (int(v4) << 64) | 0x8080808)),
        lambda v4: str(ipaddress.IPv6Address((0x20010DB8 << 96) | (0x5EFE << 32) | int(v4))),
    ]
    for text in ("127.0.0.1", "169.254.169.254", "224.0.0.1", "0.0.0.0", "255.255.255.255"):
        v4 = ipaddress.IPv4Address(text)
        with pytest.raises(AddressError):
            check_remote_address(text)
        for form in forms:
            address = form(v4)
            with pytest.raises(AddressError) as info:
                check_remote_address(address)
            # The message names the IPv4 address it found (``::0.0.0.0`` is ``::`` itself).
            assert text in str(info.value) or address == "::", (address, str(info.value))


def test_embedded_forms_are_named() -> None:
    def forms(address: str) -> list[tuple[str, str]]:
        return [(e.form, str(e.ipv4)) for e in embedded_ipv4(parse_ip(address))]

    assert forms("192.0.2.1") == []
    assert forms("2001:db8::1") == []
    assert forms("::1") == [] and forms("::") == []
    assert forms("::ffff:192.0.2.1") == [("IPv4-mapped", "192.0.2.1")]
    assert forms("::192.0.2.1") == [("IPv4-compatible", "192.0.2.1")]
    assert forms("::ffff:0:192.0.2.1") == [("IPv4-translated", "192.0.2.1")]
    assert forms("64:ff9b::192.0.2.1") == [("NAT64", "192.0.2.1")]
    assert forms("2002:c000:201::") == [("6to4", "192.0.2.1")]
    assert forms("2001:0:4136:e378:8000:63bf:3fff:fdd2") == [
        ("Teredo server", "65.54.227.120"),
        ("Teredo client", "192.0.2.45"),
    ]
    assert forms("fe80::5efe:c000:201") == [("ISATAP", "192.0.2.1")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.0.2.1", True),
        ("2001:db8::1", True),
        ("::ffff:127.0.0.1", True),
        ("127.0.0.1", True),  # a literal, whatever its judgement
        ("fe80::1%eth0", True),  # Envoy's STATIC endpoints take a zone index too
        ("atlasd.monitoring.svc.cluster.local", False),
        ("1.2.3", False),
        ("01.2.3.4", False),
        (" 1.2.3.4", False),
        ("", False),
        (16909060, False),
        (None, False),
    ],
)
def test_is_ip_literal(value: object, expected: bool) -> None:
    assert is_ip_literal(value) is expected


def test_parse_ip_refuses_non_strings() -> None:
    for value in (16909060, b"1.2.3.4", None, ["1.2.3.4"]):
        with pytest.raises(AddressError, match="must be a string"):
            parse_ip(value)


@pytest.mark.parametrize("address", ["::ffff:127.0.0.1", "::ffff:169.254.169.254"])
def test_validation_refuses_the_issue_bypasses(address: str) -> None:
    problems = validate_cluster(cluster_service("east", address), Settings())
    assert isinstance(problems, list)
    assert [p.field for p in problems] == ["spec.externalIPs[0]"]
    assert "IPv4-mapped" in problems[0].message


def test_validation_writes_a_mapped_address_as_ipv4() -> None:
    cluster = validate_cluster(cluster_service("east", "::ffff:203.0.113.7"), Settings())
    assert not isinstance(cluster, list)
    assert cluster.external_ip == "203.0.113.7"


async def test_a_store_declaring_a_mapped_loopback_gets_a_problem(tmp_path: Path) -> None:
    """The standalone path: clusters/*.yaml -> FileStore -> validation."""
    store = FileStore(tmp_path / "s")
    (store.clusters_dir / "east.yaml").write_text(
        "apiVersion: v1\nkind: Service\n"
        "metadata: {name: east, labels: {goatlas.io/cluster: 'true'}}\n"
        "spec: {externalIPs: ['::ffff:127.0.0.1'], ports: [{name: thanos, port: 10901}]}\n"
    )
    items, _ = await store.list(SERVICES)
    clusters, problems = validate_all(items, Settings())
    assert clusters == ()
    assert [(p.source.name, p.field) for p in problems] == [("east", "spec.externalIPs[0]")]
    assert "loopback" in problems[0].message
