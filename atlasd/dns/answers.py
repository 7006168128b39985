"""How large the SRV answer for each name of the zone is, and whether it fits one DNS message.

A DNS message is at most 65,535 bytes (RFC 1035 4.2.2: TCP carries a 16-bit length). An
SRV name with more records than fit is answered truncated (TC set) even over TCP, and
Thanos Query's resolver then fails every lookup of that name: a running Query keeps its
last good list (new clusters never appear), a fresh one sees none (issue 23). This
module computes, without I/O, the size of the answer CoreDNS sends for each SRV name, so
atlasd can say so before Thanos fails.

The size is the one CoreDNS v1.12 (miekg/dns ``Msg.Truncate``) decides truncation by,
measured against the real CoreDNS in ``tests/integration/test_dns_answer_size.py``:

- a reply first goes uncompressed; if that is larger than 65,535 bytes (TCP) it is
  compressed, and only if the compressed *answer section* still does not fit is it cut
  and TC set (the authority NS record is dropped silently, without TC);
- compressed, every SRV owner is a 2-byte pointer to the question; the SRV target is
  never compressed (RFC 2782), so a record is ``2 + 10 (type, class, TTL, length) + 6
  (priority, weight, port) + wire length of the target``;
- header 12 bytes, question ``wire length of the name + 4``;
- CoreDNS's ``file`` plugin adds the zone's NS record in the authority section: owner
  ``atlas.`` (a pointer), the name server ``atlasd-dns.<ns>.svc.<domain>.`` as its first
  label and a pointer to the targets' ``<ns>.svc.<domain>.``: 25 bytes;
- TC is set when any record of any section is left out (``Msg.Truncate`` sets it for
  the authority section too), so the authority record counts: 922 records of 71 bytes
  (65,514 bytes) are all sent, but with TC set, because the NS record no longer fits.

So ``bytes = 12 + (wire(name) + 4) + sum(18 + wire(target)) + 25`` and the answer is
truncated exactly when that exceeds 65,535. Over UDP every answer larger than 512 bytes
(or the client's EDNS buffer) is truncated too, which is harmless: the resolver retries
over TCP. An OPT record (11 bytes) is added only if the client sent EDNS; ``fits`` keeps
that much headroom (``EDNS_RESERVE``) so the flag is raised a record early rather than
late.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from atlasd.dns.zone import NAME_SERVER_SERVICE, SrvRecord

MAX_MESSAGE = 65_535
HEADER = 12
# Type, class, TTL and RDLENGTH of a resource record.
RR_FIXED = 10
# Priority, weight and port of an SRV record's RDATA.
SRV_FIXED = 6
# A compressed owner name: a pointer to the question's name.
POINTER = 2
# An OPT pseudo-record (EDNS0) with no options.
EDNS_RESERVE = 11
# The authority NS record: owner pointer, fixed fields, the name server's first label,
# a pointer to "<ns>.svc.<domain>." (every SRV target of the zone ends so).
AUTHORITY = POINTER + RR_FIXED + 1 + len(NAME_SERVER_SERVICE) + POINTER


def wire_length(name: str) -> int:
    """Bytes of an absolute domain name (trailing dot) in uncompressed wire format:
    a length byte per label plus the root's zero byte."""
    if not name.endswith("."):
        raise ValueError(f"{name!r} is not an absolute name")
    # "a.b." -> 1+1 + 1+1 + 1 = len("a.b.") + 1; the root "." alone is 1 byte.
    return 1 if name == "." else len(name) + 1


def record_bytes(target: str) -> int:
    """One SRV record in a compressed answer (owner = pointer to the question)."""
    return POINTER + RR_FIXED + SRV_FIXED + wire_length(target)


def question_bytes(name: str) -> int:
    return HEADER + wire_length(name) + 4


@dataclass(frozen=True)
class AnswerSize:
    """The SRV answer for one name: how many records, how many bytes over TCP."""

    name: str
    records: int
    # Header, question and answer section (what the records cost).
    answer_bytes: int

    @property
    def bytes(self) -> int:
        """The whole reply with the authority record: what decides truncation."""
        return self.answer_bytes + AUTHORITY

    @property
    def truncated(self) -> bool:
        """CoreDNS cannot send every record of this name in one message (TC is set,
        and Thanos Query fails every lookup of the name)."""
        return self.bytes > MAX_MESSAGE

    @property
    def near_limit(self) -> bool:
        """Within ``EDNS_RESERVE`` of the limit: a client sending EDNS would see TC."""
        return self.bytes + EDNS_RESERVE > MAX_MESSAGE


def answer_size(name: str, *, records: int, target_bytes: int) -> AnswerSize:
    """The answer for ``name`` with ``records`` records whose targets' wire lengths sum
    to ``target_bytes`` (what ``AnswerTally`` keeps per name)."""
    size = question_bytes(name) + records * (POINTER + RR_FIXED + SRV_FIXED) + target_bytes
    return AnswerSize(name, records, size)


def answer_sizes(recs: Iterable[SrvRecord]) -> dict[str, AnswerSize]:
    """The answer size of every SRV owner name in ``recs`` (records de-duplicated, as
    the zone is)."""
    counts: dict[str, int] = {}
    targets: dict[str, int] = {}
    for rec in set(recs):
        counts[rec.owner] = counts.get(rec.owner, 0) + 1
        targets[rec.owner] = targets.get(rec.owner, 0) + wire_length(rec.target)
    return {
        name: answer_size(name, records=counts[name], target_bytes=targets[name])
        for name in sorted(counts)
    }


class AnswerTally:
    """Per SRV name: record count and summed target bytes, kept as clusters come and go,
    so a change costs that cluster's records, not a walk over the zone. Plain (no I/O).

    Invariant: ``_count[name]`` and ``_bytes[name]`` are the sums over the records ``add``
    was given minus those ``remove`` was given; a name whose count reaches 0 is dropped.
    """

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}

    def add(self, recs: Iterable[SrvRecord]) -> None:
        for rec in recs:
            self._count[rec.owner] = self._count.get(rec.owner, 0) + 1
            self._bytes[rec.owner] = self._bytes.get(rec.owner, 0) + wire_length(rec.target)

    def remove(self, recs: Iterable[SrvRecord]) -> None:
        for rec in recs:
            left = self._count[rec.owner] - 1
            if left:
                self._count[rec.owner] = left
                self._bytes[rec.owner] -= wire_length(rec.target)
            else:
                del self._count[rec.owner]
                del self._bytes[rec.owner]

    def sizes(self) -> dict[str, AnswerSize]:
        return {
            name: answer_size(name, records=self._count[name], target_bytes=self._bytes[name])
            for name in sorted(self._count)
        }
