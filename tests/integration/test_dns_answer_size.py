"""The SRV answer size atlasd computes against the real CoreDNS: the flag says truncated
exactly when CoreDNS's answer over TCP is (TC set, records missing)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.flags
import dns.message
import pytest

from atlasd.dns.answers import AnswerSize, answer_sizes
from atlasd.dns.zone import records, render_zone
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness.coredns import CoreDNS
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

SETTINGS = Settings()


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
    """(message length, TC flag, answer records) of CoreDNS's TCP reply for ``name`` SRV."""
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


def largest_that_fits(name: str, *, name_len: int, group: str | None) -> int:
    """The most clusters whose answer for ``name`` fits, by atlasd's computation."""
    lo, hi = 1, 2000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size_of(mid, name, name_len=name_len, group=group).truncated:
            hi = mid - 1
        else:
            lo = mid
    return lo


def size_of(n: int, name: str, *, name_len: int, group: str | None) -> AnswerSize:
    return answer_sizes(records(fleet(n, name_len=name_len, group=group)))[name]


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
    zone = tmp_path / "atlas.zone"
    zone.write_text(render_zone(fleet(1, name_len=name_len, group=group), serial=1))
    coredns = CoreDNS(zone, workdir=tmp_path, reload="100ms").start()
    try:
        serial = 1
        for n in (limit - 1, limit, limit + 1, limit + 50):
            serial += 1
            zone.write_text(render_zone(fleet(n, name_len=name_len, group=group), serial=serial))
            expected = size_of(n, name, name_len=name_len, group=group)

            def reloaded(want: int = serial) -> bool:
                return coredns.query("atlas.", "SOA", tcp=True)[0].split()[2] == str(want)

            wait_until(reloaded, timeout=15, what=f"CoreDNS serving serial {serial}")
            length, truncated, answers = tcp_answer(coredns.port, name)
            assert truncated == expected.truncated, (n, length, expected)
            if expected.truncated:
                # TC set; past the limit by more than the authority record, records lost.
                assert answers <= n if n == limit + 1 else answers < n
            else:
                assert answers == n
                # Everything was sent, the authority NS record too: the size is exact.
                assert length == expected.bytes, (length, expected)
    finally:
        coredns.stop()
