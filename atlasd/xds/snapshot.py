"""Immutable, content-versioned, consistency-checked sets of Envoy resources for one node.

A ``Resource`` is one serialized Envoy message plus what it references. Versions are
content hashes: a resource's version is the hash of its bytes, a type's version is the
hash of its (name, version) pairs. Rebuilding an unchanged fleet therefore yields equal
versions, and the server sends nothing.

``Snapshot.create`` refuses an inconsistent set (``InconsistentSnapshot``): every
resource a listener, route or cluster names must exist, and secrets must be exactly the
referenced ones (an unreferenced or missing secret leaves Envoy listeners warming).

Errors::

    ValueError
     └── InconsistentSnapshot   (a dangling reference or an unreferenced secret)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_PREFIX = "type.googleapis.com/"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Make-before-break: what is referenced goes out before what references it.
# Secrets first (clusters and listeners name them), then CDS -> EDS -> LDS -> RDS;
# removals of stale resources follow in a separate, final step (see ``protocol``).
PUSH_ORDER: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)
# SotW responses of these types must carry the full set (Envoy treats absence as removal).
FULL_STATE_TYPES = frozenset({CLUSTER, LISTENER})

SHORT_NAMES = {SECRET: "sds", CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}


class InconsistentSnapshot(ValueError):
    """A snapshot names a resource it does not hold, or holds an unreferenced secret."""


def content_version(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=8).hexdigest()


@dataclass(frozen=True)
class Resource:
    """One serialized Envoy resource. ``refs`` = the (type_url, name) pairs it names."""

    type_url: str
    name: str
    body: bytes = field(repr=False)
    refs: frozenset[tuple[str, str]] = frozenset()
    version: str = ""

    @classmethod
    def of(
        cls, type_url: str, name: str, body: bytes, refs: Iterable[tuple[str, str]] = ()
    ) -> Resource:
        return cls(type_url, name, body, frozenset(refs), content_version(body))


def type_version(resources: Mapping[str, Resource]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(resources):
        h.update(name.encode())
        h.update(b"\0")
        h.update(resources[name].version.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """All resources of one node, by type URL then name, with a version per type.

    Invariant: consistent (checked in ``create``); never mutated after creation.
    """

    node: str
    resources: Mapping[str, Mapping[str, Resource]]
    versions: Mapping[str, str]

    @classmethod
    def create(cls, node: str, resources: Iterable[Resource]) -> Snapshot:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        for r in resources:
            bucket = by_type.setdefault(r.type_url, {})
            if r.name in bucket:
                raise InconsistentSnapshot(f"node {node}: duplicate {r.type_url} {r.name!r}")
            bucket[r.name] = r
        check_consistency(node, by_type)
        frozen = {t: MappingProxyType(rs) for t, rs in by_type.items()}
        versions = {t: type_version(rs) for t, rs in by_type.items()}
        return cls(node, MappingProxyType(frozen), MappingProxyType(versions))

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, "")

    def get(self, type_url: str, name: str) -> Resource | None:
        return self.of_type(type_url).get(name)


def check_consistency(node: str, by_type: Mapping[str, Mapping[str, Resource]]) -> None:
    """Raise ``InconsistentSnapshot`` on a dangling reference or an unreferenced secret."""
    referenced_secrets: set[str] = set()
    for rs in by_type.values():
        for r in rs.values():
            for t, name in r.refs:
                if name not in by_type.get(t, {}):
                    raise InconsistentSnapshot(
                        f"node {node}: {SHORT_NAMES.get(r.type_url, r.type_url)} {r.name!r} "
                        f"names missing {SHORT_NAMES.get(t, t)} {name!r}"
                    )
                if t == SECRET:
                    referenced_secrets.add(name)
    unreferenced = set(by_type.get(SECRET, {})) - referenced_secrets
    if unreferenced:
        raise InconsistentSnapshot(f"node {node}: unreferenced secrets {sorted(unreferenced)}")
