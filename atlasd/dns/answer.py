"""How large each SRV answer of the zone is, and whether it still fits in one DNS message.

A DNS message is at most 65,535 bytes (its length is 16 bits, RFC 1035 4.2.2), even over
TCP. The zone serves every sidecar of a name (``_thanos._tcp.sidecars.thanos.atlas.``, or
a DNS group's) in one answer; past the limit CoreDNS truncates it and Thanos Query's
resolver (v0.39) fails every lookup of the name: a running Query freezes at its last good
list, a fresh one sees no cluster. With atlasd's names that is ~935 sidecars.

``answer_bytes`` is the size of CoreDNS's answer to an SRV query for a name over TCP (no
EDNS): the header, the question, per record its owner (a compression pointer to the
question), type, class, TTL, length, priority, weight, port and target, and the zone's NS
record CoreDNS adds as authority. Targets are written out in full: CoreDNS (miekg/dns)
does not compress SRV targets, as RFC 2782 asks. This is the size of the compressed
answer, the one CoreDNS (miekg/dns ``Msg.Truncate``) decides truncation by: a reply is
sent uncompressed only while that fits, and TC is set as soon as any record of any
section, the authority NS record included, is left out.
tests/integration/test_dns_answer_size.py checks the figure byte for byte against the
real CoreDNS's reply just below and above the limit, for short, long and grouped names.

``AnswerSizes`` keeps the size of every name as records come and go (a change of one
cluster costs that cluster's records), for the zone writer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from atlasd.dns.zone import SrvRecord

MAX_MESSAGE = 65_535
_HEADER = 12
# Per SRV record besides its target: owner (pointer) 2, type 2, class 2, TTL 4, RDLENGTH 2,
# priority 2, weight 2, port 2.
_RECORD_FIXED = 18


def wire_length(name: str) -> int:
    """Bytes of an absolute domain name in wire format, uncompressed."""
    labels = [label for label in name.rstrip(".").split(".") if label]
    return sum(len(label.encode("ascii")) + 1 for label in labels) + 1


def record_bytes(record: SrvRecord) -> int:
    """What one SRV record adds to an answer for its owner."""
    return _RECORD_FIXED + wire_length(record.target)


def _frame(name: str, name_server: str) -> int:
    # Header, question (name, type, class), and the authority NS record: owner pointer,
    # type, class, TTL, length, and its name server as its first label plus a pointer to
    # the rest ("<ns>.svc.<domain>.", which every SRV target of the zone ends with: miekg/dns
    # compresses the NS target against them, though it leaves the SRV targets themselves
    # uncompressed).
    first = name_server.split(".", 1)[0]
    return _HEADER + wire_length(name) + 4 + 12 + 1 + len(first.encode("ascii")) + 2


def answer_bytes(name: str, records: Iterable[SrvRecord], *, name_server: str) -> int:
    """The size of the answer to an SRV query for ``name`` holding ``records``."""
    return _frame(name, name_server) + sum(record_bytes(r) for r in records)


@dataclass(frozen=True)
class Answer:
    """One SRV name the zone serves: how many records its answer holds, and its size."""

    name: str
    records: int
    bytes: int

    @property
    def too_large(self) -> bool:
        return self.bytes > MAX_MESSAGE


class AnswerSizes:
    """Every owner name's answer size, kept as records are added and removed.

    Invariant: ``_bytes[n]`` is the sum of ``record_bytes`` of the records of owner ``n``
    added and not removed, ``_count[n]`` their number; names with none are absent."""

    def __init__(self) -> None:
        self._bytes: dict[str, int] = {}
        self._count: dict[str, int] = {}

    def add(self, records: Iterable[SrvRecord], sign: int = 1) -> None:
        for r in records:
            n = self._count.get(r.owner, 0) + sign
            if n:
                self._count[r.owner] = n
                self._bytes[r.owner] = self._bytes.get(r.owner, 0) + sign * record_bytes(r)
            else:
                self._count.pop(r.owner, None)
                self._bytes.pop(r.owner, None)

    def remove(self, records: Iterable[SrvRecord]) -> None:
        self.add(records, -1)

    def answers(self, *, name_server: str) -> tuple[Answer, ...]:
        """Every name's answer (the zone's NS is ``name_server``), largest first."""
        out = [
            Answer(name, self._count[name], _frame(name, name_server) + size)
            for name, size in self._bytes.items()
        ]
        return tuple(sorted(out, key=lambda a: (-a.bytes, a.name)))
