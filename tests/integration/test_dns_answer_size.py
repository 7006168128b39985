"""The SRV answer size atlasd computes against the real CoreDNS: exact in bytes where the
answer fits, and flagged too large exactly where CoreDNS's reply over TCP is truncated
(TC set, records missing: the answer Thanos Query then fails on)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.flags
import dns.message
import pytest

from atlasd.dns.answer import Answer, AnswerSizes
from atlasd.dns.zone import name_server, records, render_zone
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness.coredns import CoreDNS
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

SETTINGS = Settings(namespace="monitoring")


def fleet(n: int, *, name_len: int, group: str | None) -> Fleet:
    return Fleet.of(
        SETTINGS,
        [
            DownstreamCluster(
                name=(f"c{i:05d}" + "x" * name_len)[:name_len],
                external_ip="192.0.2.1",
                ports=(ServicePort("thanos", 10901),),
                dns_group=group,
            )
            for i in range(n)
        ],
    )


def tcp_answer(port: int, name: str) -> tuple[int, bool, int]:
    """(message length, TC flag, answer records) of CoreDNS's TCP reply for ``name`` SRV,
    read off the wire (the length CoreDNS sent, not a re-encoding)."""
    query = dns.message.make_query(name, "SRV", use_edns=False).to_wire()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = sock.recv(65536)
            assert chunk, "CoreDNS closed the connection"
            data += chunk
    length = struct.unpack("!H", data[:2])[0]
    msg = dns.message.from_wire(data[2 : 2 + length])
    return length, bool(msg.flags & dns.flags.TC), sum(len(rrset) for rrset in msg.answer)


def size_of(n: int, name: str, *, name_len: int, group: str | None) -> Answer:
    sizes = AnswerSizes()
    sizes.add(records(fleet(n, name_len=name_len, group=group)))
    [answer] = [a for a in sizes.answers(name_server=name_server(SETTINGS)) if a.name == name]
    return answer


def largest_that_fits(name: str, *, name_len: int, group: str | None) -> int:
    """The most clusters whose answer for ``name`` fits, by atlasd's computation."""
    lo, hi = 1, 2000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size_of(mid, name, name_len=name_len, group=group).too_large:
            hi = mid - 1
        else:
            lo = mid
    return lo


@pytest.mark.parametrize(
    ("name_len", "group"), [(6, None), (30, None), (12, "prod")], ids=["short", "long", "group"]
)
def test_flag_matches_coredns_truncation(tmp_path: Path, name_len: int, group: str | None) -> None:
    name = (
        "_thanos._tcp.sidecars.thanos.atlas."
        if group is None
        else f"_thanos._tcp.{group}.sidecars.thanos.atlas."
    )
    limit = largest_that_fits(name, name_len=name_len, group=group)
    assert 500 < limit < 1100, limit  # ~935 sidecars with short names, fewer with long
    zone = tmp_path / "atlas.zone"
    zone.write_text(render_zone(fleet(1, name_len=name_len, group=group), serial=1))
    coredns = CoreDNS(zone, workdir=tmp_path, reload="100ms").start()
    try:
        serial = 1
        for n in (limit - 1, limit, limit + 1, limit + 50):
            serial += 1
            zone.write_text(render_zone(fleet(n, name_len=name_len, group=group), serial=serial))
            expected = size_of(n, name, name_len=name_len, group=group)
            assert expected.records == n

            def reloaded(want: int = serial) -> bool:
                return coredns.query("atlas.", "SOA", tcp=True)[0].split()[2] == str(want)

            wait_until(reloaded, timeout=15, what=f"CoreDNS serving serial {serial}")
            length, truncated, answers = tcp_answer(coredns.port, name)
            assert truncated == expected.too_large, (n, length, expected)
            if expected.too_large:
                # TC set; past the limit by more than the authority record, records lost.
                assert answers <= n if n == limit + 1 else answers < n
            else:
                # Everything was sent, the authority NS record too: the size is exact.
                assert answers == n
                assert length == expected.bytes, (length, expected)
    finally:
        coredns.stop()
