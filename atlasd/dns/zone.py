"""The ``atlas.`` zone: which SRV records exist, the SOA serial policy, and the zone text.

Everything here is pure (no I/O, no clock): the writer (``atlasd.dns.writer``) passes
the fleet, the previous serial and the current time in, and gets records, a serial and
text back.

Records (docs/interface.md "The DNS zone"; "beyond" item 6; docs/dns.md):

- for every sidecar Service ``<cluster>-thanos-sidecar<i>`` and every port of the
  cluster Service, ``_<port-name>._<proto>.sidecars.thanos.atlas. 60 IN SRV 10 100
  <port> <svc>.<ns>.svc.<cluster-domain>.``;
- a cluster with ``dns_group`` ``g`` is also published under
  ``_<port-name>._<proto>.g.sidecars.thanos.atlas.``, so a Thanos Query pointed at
  ``dnssrvnoa+_thanos._tcp.g.sidecars.thanos.atlas.`` sees only that group.

``<proto>`` is the port's protocol in lower case (``tcp`` for every port atlasd
proxies; RFC 2782 names the protocol there).

Defence in depth: the model is supposed to hold validated values only, but a zone
file is a text format where a newline, a ``;``, a ``$INCLUDE`` or a dot in a name
would add, comment out or redirect records. So every name that reaches the text is
re-checked here to be a DNS-1123 label (or a dot-separated sequence of them, for the
cluster domain), every port an ``int`` in range. Nothing is escaped or repaired:
input that fails the check raises, and no text is produced at all.

Serial policy: the serial is a Unix timestamp (seconds), and it only grows:
``next_serial(previous, now) = max(previous + 1, int(now))``. The previous serial is
read back from the zone file (and the ConfigMap mirror) that an earlier run wrote, so
it grows across restarts too, and a clock that steps back never makes it shrink. A
burst of changes faster than one per second runs ahead of the clock and the clock
catches up later. Unix time fits the 32-bit SOA serial until 2106; past
``2**32 - 1`` the serial would wrap, which ``next_serial`` refuses rather than do.

Errors::

    ValueError
     +-- ZoneError                 anything this module refuses
          +-- InvalidZoneInput     a name/port/replica count that must not reach the zone
          +-- SerialError          no larger serial fits in 32 bits, or a bad previous one
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings

ORIGIN = "atlas."
SIDECARS_DOMAIN = "sidecars.thanos.atlas."
TTL = 60
SRV_PRIORITY = 10
SRV_WEIGHT = 100
# SOA timers: refresh, retry, expire, and the negative-caching TTL (RFC 2308). The
# negative TTL is short so a resolver that asked for a new group before it existed
# sees it soon after it does.
SOA_REFRESH = 7200
SOA_RETRY = 3600
SOA_EXPIRE = 1209600
SOA_NEGATIVE_TTL = 30
SOA_RNAME = "hostmaster.atlas."
# The name server named in SOA and NS: the DNS Service of charts/atlasd (release "atlasd").
# Informational only: the zone is served directly or forwarded to by address, never
# reached by delegation, so nothing resolves this name. Out of zone, so it needs no glue.
NAME_SERVER_SERVICE = "atlasd-dns"
MAX_SERIAL = 2**32 - 1

# DNS-1123 label as Kubernetes defines it (lower case; what a Service name is).
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_MAX_NAME = 253  # presentation length of a domain name without the trailing dot


class ZoneError(ValueError):
    """Something this module refuses to put into (or read from) a zone."""


class InvalidZoneInput(ZoneError):
    """A value from the model that is not safe to write into zone text."""


class SerialError(ZoneError):
    """The SOA serial cannot grow (32-bit overflow) or the previous one is malformed."""


@dataclass(frozen=True)
class SrvRecord:
    """One SRV record; ``sort_key`` (its fields in order) is the zone's sort order.

    ``owner`` and ``target`` are absolute names (trailing dot).
    """

    owner: str
    target: str
    port: int
    priority: int = SRV_PRIORITY
    weight: int = SRV_WEIGHT
    ttl: int = TTL

    def sort_key(self) -> tuple[str, str, int, int, int, int]:
        # A plain tuple key: dataclass-generated comparisons are ~3x slower to sort by.
        return (self.owner, self.target, self.port, self.priority, self.weight, self.ttl)

    def text(self) -> str:
        return (
            f"{self.owner} {self.ttl} IN SRV {self.priority} {self.weight} {self.port} "
            f"{self.target}"
        )


def _label(value: object, *, what: str) -> str:
    if not isinstance(value, str) or len(value) > 63 or not _LABEL.fullmatch(value):
        raise InvalidZoneInput(f"{what}: {value!r} is not a DNS-1123 label")
    return value


def _domain(value: object, *, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise InvalidZoneInput(f"{what}: {value!r} is not a domain name")
    for part in value.split("."):
        _label(part, what=what)
    return value


def _port_number(value: object, *, what: str) -> int:
    # bool is an int subclass; True is not a port.
    if type(value) is not int or not 1 <= value <= 65535:
        raise InvalidZoneInput(f"{what}: {value!r} is not a port number")
    return value


def _absolute(name: str, *, what: str) -> str:
    if len(name) - 1 > _MAX_NAME:
        raise InvalidZoneInput(f"{what}: {name[:80]!r}... is longer than a domain name may be")
    return name


def _owners(port_name: str, protocol: str, group: str | None) -> tuple[str, ...]:
    """The SRV owner names of one port."""
    name = _label(port_name, what="port name")
    proto = _PROTOCOLS.get(protocol)
    if proto is None:
        raise InvalidZoneInput(f"port {name!r}: protocol {protocol!r} is not TCP/UDP/SCTP")
    # "_" + label is still at most 64 bytes; keep every label within 63.
    if len(name) > 62:
        raise InvalidZoneInput(f"port name {name!r} is too long")
    if group is None:
        return (f"_{name}._{proto}.{SIDECARS_DOMAIN}",)
    return (
        f"_{name}._{proto}.{SIDECARS_DOMAIN}",
        f"_{name}._{proto}.{group}.{SIDECARS_DOMAIN}",
    )


def _service_suffix(settings: Settings) -> str:
    """``.<ns>.svc.<cluster-domain>.``: what follows a sidecar Service name in a target."""
    namespace = _label(settings.namespace, what="settings.namespace")
    domain = _domain(settings.cluster_domain, what="settings.cluster_domain")
    return f".{namespace}.svc.{domain}."


def cluster_records(
    cluster: DownstreamCluster, settings: Settings, *, suffix: str | None = None
) -> list[SrvRecord]:
    """The SRV records one cluster contributes (unsorted); raises ``InvalidZoneInput``.

    ``suffix`` is ``_service_suffix(settings)``, passed in when rendering many clusters.
    """
    if suffix is None:
        suffix = _service_suffix(settings)
    name = _label(cluster.name, what="cluster name")
    group = None
    if cluster.dns_group is not None:
        group = _label(cluster.dns_group, what=f"cluster {name!r} dns_group")
    replicas = cluster.replicas
    if type(replicas) is not int or replicas < 0:
        raise InvalidZoneInput(f"cluster {name!r}: replicas {replicas!r} is not a count")
    if not isinstance(cluster.ports, tuple):
        raise InvalidZoneInput(f"cluster {name!r}: ports is not a tuple")
    targets = [
        _absolute(
            _label(cluster.sidecar_service(i), what=f"cluster {name!r} sidecar Service") + suffix,
            what="SRV target",
        )
        for i in range(replicas)
    ]
    out: list[SrvRecord] = []
    for port in cluster.ports:
        if not isinstance(port, ServicePort):
            raise InvalidZoneInput(f"cluster {name!r}: {port!r} is not a ServicePort")
        number = _port_number(port.port, what=f"cluster {name!r} port {port.name!r}")
        if not isinstance(port.name, str) or not isinstance(port.protocol, str):
            raise InvalidZoneInput(f"cluster {name!r}: port {port!r} has a non-text field")
        try:
            owners = _owners(port.name, port.protocol, group)
        except InvalidZoneInput as exc:
            raise InvalidZoneInput(f"cluster {name!r}: {exc}") from None
        out.extend(
            SrvRecord(owner=owner, target=target, port=number)
            for target in targets
            for owner in owners
        )
    return out


def records(fleet: Fleet) -> tuple[SrvRecord, ...]:
    """Every SRV record of the fleet, sorted and without duplicates.

    Two fleets with the same records give equal tuples, whatever the order of their
    clusters.
    """
    suffix = _service_suffix(fleet.settings)
    out: set[SrvRecord] = set()
    for cluster in fleet.clusters.values():
        out.update(cluster_records(cluster, fleet.settings, suffix=suffix))
    return tuple(sorted(out, key=SrvRecord.sort_key))


@dataclass(frozen=True)
class Block:
    """One cluster's part of the zone: its records, sorted, and their text lines."""

    records: tuple[SrvRecord, ...]
    text: str


def zone_inputs(cluster: DownstreamCluster) -> tuple[object, ...]:
    """What of a cluster its records depend on (not its external IP, nor its upstreams)."""
    return (cluster.name, cluster.ports, cluster.replicas, cluster.dns_group)


def cluster_block(cluster: DownstreamCluster, settings: Settings) -> Block:
    """The zone lines of one cluster (validated like ``cluster_records``)."""
    recs = tuple(sorted(set(cluster_records(cluster, settings)), key=SrvRecord.sort_key))
    return Block(recs, "".join(r.text() + "\n" for r in recs))


def next_serial(previous: int | None, *, now: float) -> int:
    """The serial to write next: larger than ``previous``, at least the Unix time ``now``."""
    candidate = int(now)
    if previous is not None:
        if type(previous) is not int or not 0 <= previous <= MAX_SERIAL:
            raise SerialError(f"previous serial {previous!r} is not a 32-bit serial")
        candidate = max(candidate, previous + 1)
    if not 1 <= candidate <= MAX_SERIAL:
        raise SerialError(f"serial {candidate} does not fit the 32-bit SOA serial")
    return candidate


def name_server(settings: Settings) -> str:
    """The zone's name server (its SOA MNAME and NS record)."""
    namespace = _label(settings.namespace, what="settings.namespace")
    cluster_domain = _domain(settings.cluster_domain, what="settings.cluster_domain")
    return f"{NAME_SERVER_SERVICE}.{namespace}.svc.{cluster_domain}."


def _header(settings: Settings, serial: int) -> str:
    mname = name_server(settings)
    if type(serial) is not int or not 1 <= serial <= MAX_SERIAL:
        raise SerialError(f"serial {serial!r} is not a 32-bit serial")
    lines = [
        "; The atlas. zone, written by atlasd: SRV records Thanos Query discovers its",
        "; sidecars from. Rewritten (atomically) whenever the clusters change; do not edit.",
        f"$ORIGIN {ORIGIN}",
        f"$TTL {TTL}",
        f"{ORIGIN} {TTL} IN SOA {mname} {SOA_RNAME} {serial} {SOA_REFRESH} {SOA_RETRY} "
        f"{SOA_EXPIRE} {SOA_NEGATIVE_TTL}",
        f"{ORIGIN} {TTL} IN NS {mname}",
    ]
    return "\n".join(lines) + "\n"


def render_blocks(blocks: Iterable[str], *, settings: Settings, serial: int) -> str:
    """Zone text: the SOA and NS with serial ``serial``, then ``blocks`` (from
    ``cluster_block``, which validated every name in them) in the order given."""
    return _header(settings, serial) + "".join(blocks)


def render_records(recs: tuple[SrvRecord, ...], *, settings: Settings, serial: int) -> str:
    """Zone text for ``recs`` (from ``records``) with SOA serial ``serial``."""
    return render_blocks((r.text() + "\n" for r in recs), settings=settings, serial=serial)


def render_zone(fleet: Fleet, *, serial: int) -> str:
    """The whole zone text for ``fleet``, cluster by cluster in name order (what the
    writer writes); raises ``ZoneError`` instead of emitting bad text."""
    blocks = [cluster_block(c, fleet.settings).text for c in fleet.sorted_clusters()]
    return render_blocks(blocks, settings=fleet.settings, serial=serial)


_SOA = re.compile(
    r"^\S+\s+(?:\d+\s+)?(?:IN\s+)?SOA\s+\S+\s+\S+\s+\(?\s*(\d+)\b", re.MULTILINE | re.IGNORECASE
)


def parse_serial(zone_text: str) -> int | None:
    """The SOA serial of a zone this module rendered, or ``None`` if there is no SOA.

    Used to continue the serial across restarts; a serial that is not a 32-bit number
    raises ``SerialError`` (better to stop than to go backwards).
    """
    match = _SOA.search(zone_text)
    if match is None:
        return None
    serial = int(match.group(1))
    if serial > MAX_SERIAL:
        raise SerialError(f"serial {serial} in the existing zone is not a 32-bit serial")
    return serial
