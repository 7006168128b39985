"""SRV answer sizes: wire lengths, the one-message limit, the per-name tally."""

from __future__ import annotations

import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from atlasd.dns.answers import (
    MAX_MESSAGE,
    AnswerTally,
    answer_sizes,
    wire_length,
)
from atlasd.dns.zone import SrvRecord, records
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings

OWNER = "_thanos._tcp.sidecars.thanos.atlas."


def srv(i: int, *, owner: str = OWNER, name_len: int = 6) -> SrvRecord:
    name = f"c{i:0{name_len - 1}d}"
    return SrvRecord(owner, f"{name}-thanos-sidecar0.monitoring.svc.cluster.local.", 10901)


@pytest.mark.parametrize(("name", "length"), [(".", 1), ("atlas.", 7), ("a.b.", 5), (OWNER, 36)])
def test_wire_length(name: str, length: int) -> None:
    assert wire_length(name) == length
    if name != ".":
        assert len(dns.name.from_text(name).to_wire()) == length


def test_relative_name_is_refused() -> None:
    with pytest.raises(ValueError):
        wire_length("atlas")


@pytest.mark.parametrize("n", [1, 3, 100, 922])
def test_size_equals_a_compressed_answer_dnspython_builds(n: int) -> None:
    """Independent check: the message with the same question and answer, compressed the
    way CoreDNS (miekg/dns) does — owners point at the question, SRV targets (RFC 2782)
    are not compressed, which dnspython does not do either for SRV."""
    recs = [srv(i) for i in range(n)]
    size = answer_sizes(recs)[OWNER]
    q = dns.message.make_query(OWNER, "SRV", use_edns=False)
    r = dns.message.make_response(q)
    rrset = dns.rrset.from_text_list(
        OWNER, 60, "IN", "SRV", [f"10 100 {x.port} {x.target}" for x in recs]
    )
    r.answer.append(rrset)
    assert size.records == n
    assert size.answer_bytes == len(r.to_wire(max_size=10**6))
    assert size.bytes == size.answer_bytes + 25


def test_limit_between_921_and_922_records_of_these_names() -> None:
    # Measured with CoreDNS v1.12.4: 922 such records are sent in 65,514 bytes but with TC
    # set (the 25-byte authority NS record does not fit); 921 fit with the NS record.
    assert answer_sizes([srv(i) for i in range(922)])[OWNER].answer_bytes == 65_514
    assert answer_sizes([srv(i) for i in range(922)])[OWNER].truncated
    assert not answer_sizes([srv(i) for i in range(921)])[OWNER].truncated
    # Longer names: fewer fit.
    long = answer_sizes([srv(i, name_len=40) for i in range(700)])[OWNER]
    assert long.bytes > MAX_MESSAGE and long.truncated


def test_per_name_sizes_for_groups() -> None:
    clusters = [
        DownstreamCluster(
            name=f"c{i}",
            external_ip="192.0.2.1",
            ports=(ServicePort("thanos", 10901), ServicePort("prometheus", 9090)),
            dns_group="prod" if i % 2 else None,
        )
        for i in range(10)
    ]
    sizes = answer_sizes(records(Fleet.of(Settings(), clusters)))
    assert sizes[OWNER].records == 10
    assert sizes["_thanos._tcp.prod.sidecars.thanos.atlas."].records == 5
    assert sizes["_prometheus._tcp.prod.sidecars.thanos.atlas."].records == 5
    assert len(sizes) == 4


def test_tally_add_remove_equals_recount() -> None:
    tally = AnswerTally()
    a = [srv(i) for i in range(5)]
    b = [srv(i, owner="_thanos._tcp.g.sidecars.thanos.atlas.") for i in range(3)]
    tally.add(a)
    tally.add(b)
    tally.remove(a[:2])
    assert tally.sizes() == answer_sizes(a[2:] + b)
    tally.remove(b)
    assert list(tally.sizes()) == [OWNER]
