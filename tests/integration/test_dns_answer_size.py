"""The SRV answer size atlasd computes is what the real CoreDNS sends, and the limit it
flags is where CoreDNS starts truncating (the answer Thanos Query then fails on)."""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest

from atlasd.dns.answer import MAX_MESSAGE, AnswerSizes
from atlasd.dns.zone import name_server, records, render_records
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness.coredns import CoreDNS

pytestmark = pytest.mark.integration

SETTINGS = Settings(namespace="monitoring")
NAME = "_thanos._tcp.sidecars.thanos.atlas."


def _fleet(n: int) -> Fleet:
    return Fleet.of(
        SETTINGS,
        tuple(
            DownstreamCluster(
                name=f"c{i:05d}",
                external_ip=f"198.18.{i // 250}.{i % 250 + 1}",
                ports=(ServicePort("thanos", 10901),),
            )
            for i in range(n)
        ),
    )


def test_answer_size_and_limit_match_coredns(tmp_path: Path) -> None:
    zone = tmp_path / "atlas.zone"
    flagged = {}
    for n in (500, 900, 940):
        recs = records(_fleet(n))
        zone.write_text(render_records(recs, settings=SETTINGS, serial=n))
        sizes = AnswerSizes()
        sizes.add(recs)
        answers = sizes.answers(name_server=name_server(SETTINGS))
        [answer] = [a for a in answers if a.name == NAME]
        dns_server = CoreDNS(zone, workdir=tmp_path / str(n)).start()
        try:
            q = dns.message.make_query(NAME, dns.rdatatype.SRV)
            wire = dns.query.tcp(q, "127.0.0.1", port=dns_server.port, timeout=5)
            got = len(wire.answer[0]) if wire.answer else 0
            truncated = bool(wire.flags & dns.flags.TC)
        finally:
            dns_server.stop()
        assert answer.records == n
        flagged[n] = answer.too_large
        if answer.bytes <= MAX_MESSAGE:
            # It fits: every record, in exactly the bytes computed.
            assert (got, truncated) == (n, False)
            assert len(wire.to_wire()) == answer.bytes
        else:
            # Flagged too large: CoreDNS cuts it (Thanos then fails the lookup).
            assert answer.too_large and got < n, (got, truncated)
    assert flagged == {500: False, 900: False, 940: True}, "both sides of the limit tried"
