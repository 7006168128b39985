"""Immutable, content-versioned, consistency-checked sets of Envoy resources for one node.

A ``Resource`` is one serialized Envoy message plus what it references. Versions are
content hashes: a resource's version is the hash of its bytes (or, for a resource assembled
from cached pieces, a hash of the pieces' hashes); a type's version is an order-independent
sum of the hashes of its (name, version) pairs, so it is updated in O(changed) when a
snapshot evolves. Rebuilding an unchanged fleet yields equal versions, and the server
sends nothing.

``Snapshot.create`` refuses an inconsistent set (``InconsistentSnapshot``): every resource
a listener, route or cluster names must exist, and secrets must be exactly the referenced
ones (an unreferenced or missing secret leaves Envoy listeners warming).
``Snapshot.evolve(upserts, removals)`` makes the next snapshot from this one, checking only
what changed (a reference count per named resource keeps the check exact), and records
which names changed per type, so a Delta stream sends just those.

Errors::

    ValueError
     └── InconsistentSnapshot   (a dangling reference or an unreferenced secret)
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_PREFIX = "type.googleapis.com/"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SCOPED_ROUTE = _PREFIX + "envoy.config.route.v3.ScopedRouteConfiguration"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Make-before-break: what is referenced goes out before what references it.
# Secrets first (clusters and listeners name them), then CDS -> EDS -> LDS -> SRDS -> RDS;
# removals of stale resources follow in a separate, final step (see ``protocol``).
PUSH_ORDER: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)
# SotW responses of these types must carry the full set (Envoy treats absence as removal).
FULL_STATE_TYPES = frozenset({CLUSTER, LISTENER, SCOPED_ROUTE})
# SotW responses of these types may carry only what changed (the xDS protocol allows it
# for every type but listeners and clusters; Envoy keeps what a response leaves out).
PARTIAL_TYPES = frozenset({ENDPOINT})

SHORT_NAMES = {
    SECRET: "sds",
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    SCOPED_ROUTE: "srds",
    ROUTE: "rds",
}

_MOD = 2**64
Ref = tuple[str, str]


class InconsistentSnapshot(ValueError):
    """A snapshot names a resource it does not hold, or holds an unreferenced secret."""


def content_version(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def _pair_hash(name: str, version: str) -> int:
    h = hashlib.blake2b(name.encode(), digest_size=8)
    h.update(b"\0")
    h.update(version.encode())
    return int.from_bytes(h.digest(), "big")


def _sum_text(total: int) -> str:
    return f"{total % _MOD:016x}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (tag, length, payload)."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


@dataclass(frozen=True)
class Resource:
    """One serialized Envoy resource. ``refs`` = the (type_url, name) pairs it names."""

    type_url: str
    name: str
    body: bytes = field(repr=False)
    refs: frozenset[Ref] = frozenset()
    version: str = ""

    @classmethod
    def of(cls, type_url: str, name: str, body: bytes, refs: Iterable[Ref] = ()) -> Resource:
        return cls(type_url, name, body, frozenset(refs), content_version(body))

    @functools.cached_property
    def any_field(self) -> bytes:
        """This resource as an encoded ``google.protobuf.Any`` in a repeated field number 2
        (``DiscoveryResponse.resources``): encoded once, reused by every response and every
        stream that carries it."""
        packed = field_bytes(1, self.type_url.encode()) + field_bytes(2, self.body)
        return field_bytes(2, packed)


def type_version(resources: Mapping[str, Resource]) -> str:
    """The version of a set of resources of one type (order-independent)."""
    return _sum_text(sum(_pair_hash(n, r.version) for n, r in resources.items()))


def extend_version(base: str, extra: Mapping[str, Resource]) -> str:
    """The version of a type's set plus ``extra`` resources not in it, from its version."""
    return _sum_text(int(base, 16) + sum(_pair_hash(n, r.version) for n, r in extra.items()))


class HeldVersions:
    """What one Envoy holds of one type: per name, the version of the resource sent to it,
    and the version of that set (``type_version`` of the same resources, so equal to the
    snapshot's type version once it holds all of them), kept up to date name by name."""

    def __init__(self) -> None:
        self.versions: dict[str, str] = {}
        self._sum = 0

    @property
    def version(self) -> str:
        return _sum_text(self._sum)

    def get(self, name: str) -> str | None:
        return self.versions.get(name)

    def version_with(self, resources: Iterable[Resource]) -> str:
        """The set's version once ``resources`` are held too (nothing changes)."""
        total = self._sum
        for r in resources:
            old = self.versions.get(r.name)
            if old is not None:
                total -= _pair_hash(r.name, old)
            total += _pair_hash(r.name, r.version)
        return _sum_text(total)

    def hold(self, resources: Iterable[Resource]) -> None:
        for r in resources:
            old = self.versions.get(r.name)
            if old is not None:
                self._sum -= _pair_hash(r.name, old)
            self.versions[r.name] = r.version
            self._sum += _pair_hash(r.name, r.version)

    def keep_only(self, names: set[str]) -> None:
        """Forget what is no longer subscribed (the Envoy drops it with its watch)."""
        for n in [n for n in self.versions if n not in names]:
            self._sum -= _pair_hash(n, self.versions.pop(n))


@dataclass(frozen=True, eq=False)
class Snapshot:
    """All resources of one node, by type URL then name, with a version per type.

    Invariants: consistent (checked in ``create`` and ``evolve``); never mutated after
    creation; ``_sums[t]`` is the sum of the pair hashes of type ``t``; ``_refcount[r]``
    the number of resources naming ``r``. ``changed`` lists, per type, the names that differ
    from ``base`` (the snapshot this one evolved from); None when made from scratch.
    """

    node: str
    resources: Mapping[str, Mapping[str, Resource]]
    versions: Mapping[str, str]
    # The plain dicts behind ``resources`` and the reference counts: never mutated once the
    # snapshot exists; ``evolve`` copies them (a C-level copy, unlike a read-only view's).
    _raw: dict[str, dict[str, Resource]] = field(repr=False, default_factory=dict)
    _sums: Mapping[str, int] = field(repr=False, default_factory=dict)
    _refcount: dict[Ref, int] = field(repr=False, default_factory=dict)
    changed: Mapping[str, frozenset[str]] | None = field(repr=False, default=None)
    base: weakref.ref[Snapshot] | None = field(repr=False, default=None)

    @classmethod
    def create(cls, node: str, resources: Iterable[Resource]) -> Snapshot:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        refcount: dict[Ref, int] = {}
        for r in resources:
            bucket = by_type.setdefault(r.type_url, {})
            if r.name in bucket:
                raise InconsistentSnapshot(f"node {node}: duplicate {r.type_url} {r.name!r}")
            bucket[r.name] = r
            for ref in r.refs:
                refcount[ref] = refcount.get(ref, 0) + 1
        check_consistency(node, by_type)
        sums = {
            t: sum(_pair_hash(n, r.version) for n, r in rs.items()) for t, rs in by_type.items()
        }
        return cls._make(node, by_type, sums, refcount, None, None)

    @classmethod
    def _make(
        cls,
        node: str,
        by_type: dict[str, dict[str, Resource]],
        sums: dict[str, int],
        refcount: dict[Ref, int],
        changed: Mapping[str, frozenset[str]] | None,
        base: Snapshot | None,
    ) -> Snapshot:
        frozen = {t: MappingProxyType(rs) for t, rs in by_type.items()}
        versions = {t: _sum_text(s) for t, s in sums.items()}
        return cls(
            node,
            MappingProxyType(frozen),
            MappingProxyType(versions),
            by_type,
            MappingProxyType(sums),
            refcount,
            changed,
            weakref.ref(base) if base is not None else None,
        )

    def evolve(self, upserts: Iterable[Resource] = (), removals: Iterable[Ref] = ()) -> Snapshot:
        """The next snapshot: ``upserts`` added or replaced, ``removals`` dropped.

        Only changed types are copied; consistency is checked for what changed. Upserts equal
        to what is held are ignored, so ``changed`` names real differences only.
        """
        by_type = dict(self._raw)
        copied: set[str] = set()
        sums = dict(self._sums)
        # Copied on the first write only: most changes (an endpoint, a route) move no
        # reference, and at 5,000 clusters the copy is tens of thousands of entries.
        refcount = self._refcount
        changed: dict[str, set[str]] = {}
        touched_refs: set[Ref] = set()

        def bucket(t: str) -> dict[str, Resource]:
            if t not in copied:
                by_type[t] = by_type[t].copy() if t in by_type else {}
                copied.add(t)
            return by_type[t]

        def counts() -> dict[Ref, int]:
            nonlocal refcount
            if refcount is self._refcount:
                refcount = refcount.copy()
            return refcount

        def unref(refs: Iterable[Ref]) -> None:
            for ref in refs:
                rc = counts()
                n = rc[ref] - 1
                if n:
                    rc[ref] = n
                else:
                    del rc[ref]
                touched_refs.add(ref)

        def drop(old: Resource) -> None:
            sums[old.type_url] = sums.get(old.type_url, 0) - _pair_hash(old.name, old.version)
            unref(old.refs)

        removed: list[Ref] = []
        for t, name in removals:
            old = self.resources.get(t, {}).get(name)
            if old is None:
                continue
            del bucket(t)[name]
            drop(old)
            changed.setdefault(t, set()).add(name)
            removed.append((t, name))
        added: list[Resource] = []
        for r in upserts:
            old = by_type.get(r.type_url, {}).get(r.name)
            if old is not None and old.version == r.version and old.refs == r.refs:
                continue
            b = bucket(r.type_url)
            if old is not None:
                # Refs of a resource assembled from many pieces differ by a few: apply the
                # difference rather than dropping and re-adding every one.
                unref(old.refs - r.refs)
                for ref in r.refs - old.refs:
                    rc = counts()
                    rc[ref] = rc.get(ref, 0) + 1
                sums[r.type_url] = sums.get(r.type_url, 0) - _pair_hash(old.name, old.version)
            else:
                for ref in r.refs:
                    rc = counts()
                    rc[ref] = rc.get(ref, 0) + 1
            b[r.name] = r
            sums[r.type_url] = sums.get(r.type_url, 0) + _pair_hash(r.name, r.version)
            changed.setdefault(r.type_url, set()).add(r.name)
            added.append(r)
        if not changed:
            return self
        # Consistency of what changed.
        for r in added:
            for t, name in r.refs:
                if name not in by_type.get(t, {}):
                    raise InconsistentSnapshot(
                        f"node {self.node}: {SHORT_NAMES.get(r.type_url, r.type_url)} "
                        f"{r.name!r} names missing {SHORT_NAMES.get(t, t)} {name!r}"
                    )
        for t, name in removed:
            if refcount.get((t, name)) and name not in by_type.get(t, {}):
                raise InconsistentSnapshot(
                    f"node {self.node}: {SHORT_NAMES.get(t, t)} {name!r} is still named"
                )
        secrets = by_type.get(SECRET, {})
        for r in added:
            if r.type_url == SECRET and not refcount.get((SECRET, r.name)):
                raise InconsistentSnapshot(f"node {self.node}: unreferenced secrets {[r.name]}")
        for t, name in touched_refs:
            if t == SECRET and name in secrets and not refcount.get((t, name)):
                raise InconsistentSnapshot(f"node {self.node}: unreferenced secrets {[name]}")
        return self._make(
            self.node,
            by_type,
            sums,
            refcount,
            {t: frozenset(ns) for t, ns in changed.items()},
            self,
        )

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, _sum_text(0))

    def get(self, type_url: str, name: str) -> Resource | None:
        return self.of_type(type_url).get(name)

    def diff_from(self, other: Snapshot | None) -> Mapping[str, frozenset[str]] | None:
        """Names changed per type since ``other``, when this snapshot evolved directly
        from it; None when unknown (compare everything)."""
        if other is None or self.base is None or self.base() is not other:
            return None
        return self.changed


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
