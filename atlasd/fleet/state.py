"""The fleet: observed objects, by key, validated once per change into immutable versions.

``FleetState`` is fed every watched object as it changes (``observe``: which role, which
name, the new object or None) and records it under its key (``atlasd.fleet.keys``). When
asked (``derive``), it re-derives just the keys that changed since the last version:

- a cluster key: its cluster Service validated (``atlasd.fleet.validate``) and its mode
  settled (``enrollment_mode``: the annotation, else the default unless an identity is
  stored), its stored identity (``<c>-atlas-identity``) checked against the trusted CAs
  (none for an enrolled cluster: it is served without one), its owned objects;
- the fleet-wide key: the stored CA, trust bundle and cross-signed chain, the
  observability identity (``atlas-server`` + ``atlas-client``), atlasd's ADS server
  certificate (``atlasd-ads``), the local Alertmanagers.

A key's validation is reused while its cluster Service keeps its resourceVersion, its
identity while its identity Secret and the trust bundle are unchanged; a new trust bundle
(a CA rotation) re-checks every identity.

Fleet-wide rule: two valid clusters may not share an external IP. ``FleetState`` keeps the
claimants of each IP; the oldest (creationTimestamp, then name) serves, later ones get a
Problem; a change of one cluster re-judges only the claimants of the IPs it left and took.

Each ``derive`` returns a ``FleetUpdate``: a new immutable ``FleetVersion`` (its maps are
``immutables.Map``s sharing every unchanged key with the previous version's) and the keys
that changed — with every cluster key when what each cluster's own objects take from the
fleet-wide key changed (the Alertmanager count in its values), though no member did. Plain synchronous
code, no I/O: the daemon feeds it from its watches and hands the updates on.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

import immutables

from atlasd import labels, revocation
from atlasd.fleet.keys import (
    ALERTMANAGER_SERVICES,
    CLUSTER_SERVICES,
    FLEET_KEY,
    OWNED_SECRETS,
    OWNED_SERVICES,
    ObjectId,
    key_of,
)
from atlasd.fleet.trust import StoredCA, not_after, read_ca, renewal_time, trusted_pair
from atlasd.fleet.validate import (
    age_key,
    cluster_label_problem,
    enrollment_mode,
    identity_secret_name,
    is_cluster_service,
    select_alertmanagers,
    source_ref,
    validate_cluster,
)
from atlasd.kube import bodies
from atlasd.kube.api import Obj
from atlasd.kube.secrets import secret_data
from atlasd.model import (
    OBSERVABILITY_NODE,
    PKI,
    CertKey,
    DownstreamCluster,
    Fleet,
    Identity,
    LocalAlertmanager,
    ObjectRef,
    Problem,
    Revocation,
    Settings,
)

log = logging.getLogger(__name__)

MemberState = Literal["served", "pending", "invalid", "absent"]


@dataclass(frozen=True)
class CertInfo:
    """One certificate atlasd serves: for /status and the expiry metrics."""

    name: str  # "ca", "atlas/server", "<cluster>/client", ...
    not_after: float | None
    renew_at: float | None


def _ro(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, eq=False)
class Member:
    """One cluster key as observed and judged.

    ``state``: ``served`` (valid, its IP is its own, certificates stored and trusted, or
    enrolled: its agent holds them), ``pending`` (valid, certificates not issued yet),
    ``invalid`` (a cluster Service that fails validation or lost its IP to an older
    cluster: its objects are kept until it is fixed or deleted), ``absent`` (no cluster
    Service labelled exactly "true": what atlasd owns for it is to be removed).
    """

    name: str
    service: Obj | None
    services: Mapping[str, Obj]
    secrets: Mapping[str, Obj]
    cluster: DownstreamCluster | None
    problems: tuple[Problem, ...]
    identity: Identity | None
    certificates: tuple[CertInfo, ...]
    state: MemberState
    # What the reuse checks compare: the cluster Service's and identity Secret's versions.
    service_rv: str = ""
    identity_rv: str = ""
    trust: bytes = b""
    # Validation problems only (``problems`` adds the duplicate-IP one).
    own_problems: tuple[Problem, ...] = ()

    @property
    def is_servable(self) -> bool:
        """Valid with what its Envoy needs from atlasd: its stored identity, or nothing at
        all when it is enrolled (its agent holds its keys)."""
        if self.cluster is None:
            return False
        return self.cluster.enrolled or self.identity is not None

    @property
    def is_cluster(self) -> bool:
        """A Service labelled exactly ``goatlas.io/cluster: "true"`` exists."""
        return self.state != "absent"


@dataclass(frozen=True, eq=False)
class FleetWide:
    """The fleet-wide key: the stored PKI, the observability identity, Alertmanagers."""

    ca_secret: Obj | None = None
    # Owned fixed-name Secrets other than atlas-ca, by name.
    secrets: Mapping[str, Obj] = field(default_factory=lambda: _EMPTY)
    alertmanager_services: Mapping[str, Obj] = field(default_factory=lambda: _EMPTY)
    ca: StoredCA | None = None
    atlas_identity: Identity | None = None
    # atlasd's ADS server certificate (Secret atlasd-ads), if stored and trusted.
    ads_server: CertKey | None = None
    alertmanagers: tuple[LocalAlertmanager, ...] = ()
    pki: PKI | None = None
    problems: tuple[Problem, ...] = ()
    certificates: tuple[CertInfo, ...] = ()
    # Clusters with revoked certificates in force (Secret atlas-revocations), by name.
    revocations: Mapping[str, Revocation] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True, eq=False)
class FleetVersion:
    """One immutable version of the fleet.

    ``model`` is what xDS and DNS serve (served clusters and identities only);
    ``members`` every cluster key with any object, for reconcile and status.
    """

    number: int
    settings: Settings
    fleetwide: FleetWide
    members: Mapping[str, Member]
    model: Fleet

    def problems(self) -> list[Problem]:
        out = list(self.fleetwide.problems)
        for name in sorted(self.members):
            out.extend(self.members[name].problems)
        return out

    def object_versions(self, key: str, *, owned: bool = False) -> dict[ObjectId, str]:
        """What belongs to ``key`` in this version: (kind, name) -> resourceVersion. With
        ``owned``, only what atlasd writes for it (not the cluster Service or the
        Alertmanager Services it reads). A LIST yields the same map (``listed_versions``),
        so the two compare."""
        out: dict[ObjectId, str] = {}
        if key == FLEET_KEY:
            fw = self.fleetwide
            if fw.ca_secret is not None:
                out[("Secret", labels.CA_SECRET)] = bodies.resource_version(fw.ca_secret)
            for n, o in fw.secrets.items():
                out[("Secret", n)] = bodies.resource_version(o)
            if not owned:
                for n, o in fw.alertmanager_services.items():
                    out[("Service", n)] = bodies.resource_version(o)
            return out
        m = self.members.get(key)
        if m is None:
            return out
        if m.service is not None and not owned:
            out[("Service", m.name)] = bodies.resource_version(m.service)
        for n, o in m.services.items():
            out[("Service", n)] = bodies.resource_version(o)
        for n, o in m.secrets.items():
            out[("Secret", n)] = bodies.resource_version(o)
        return out


@dataclass(frozen=True)
class FleetUpdate:
    """A new version and the keys whose derived state may differ from the previous one;
    ``left``: keys still to derive (``derive`` stopped at its deadline), in order."""

    version: FleetVersion
    changed: frozenset[str]
    left: tuple[str, ...] = ()


@dataclass
class _Slots:
    """The raw objects recorded under one key, by (role, name)."""

    objects: dict[tuple[str, str], Obj] = field(default_factory=dict)


class FleetState:
    """The mutable side: raw objects by key, the IP claims, the latest derived members.

    Invariants: ``_key_of[(role, name)]`` is the key under which that object is recorded in
    ``_slots``; ``_claims[ip]`` holds the names of members whose validated cluster uses
    ``ip``; ``_members`` holds the latest derived member of every key with objects.
    """

    def __init__(self, settings: Settings, *, allow_loopback: bool = False) -> None:
        self.settings = settings
        self.allow_loopback = allow_loopback
        self._slots: dict[str, _Slots] = {}
        self._key_of: dict[tuple[str, str], str] = {}
        # Immutable maps (shared with the versions published): updated per derive with an
        # O(log n) mutation each, never copied whole.
        self._members: immutables.Map[str, Member] = immutables.Map()
        self._claims: dict[str, set[str]] = {}
        self._fleetwide = FleetWide()
        self._served: immutables.Map[str, DownstreamCluster] = immutables.Map()
        self._identities: immutables.Map[str, Identity] = immutables.Map()
        self._number = 0
        self._model = Fleet(settings=settings)
        # The last revocations derived, by what they were derived from (the entries in
        # force and the CA): a CRL is signed again only when one of those changes.
        self._revoked: tuple[Any, Mapping[str, Revocation]] = (None, _EMPTY)

    # -- input ---------------------------------------------------------------------------

    def observe(self, role: str, name: str, obj: Obj | None) -> set[str]:
        """Record ``obj`` (None: gone) as the current object ``name`` of ``role``; returns
        the keys it affects (its old and new key, when its labels moved it)."""
        slot = (role, name)
        old_key = self._key_of.get(slot)
        affected: set[str] = set()
        if old_key is not None:
            affected.add(old_key)
            objs = self._slots[old_key].objects
            objs.pop(slot, None)
            if not objs:
                del self._slots[old_key]
            del self._key_of[slot]
        if obj is not None:
            key = key_of(role, obj)
            self._slots.setdefault(key, _Slots()).objects[slot] = obj
            self._key_of[slot] = key
            affected.add(key)
        return affected

    def keys(self) -> set[str]:
        """Every key with recorded objects (and every derived member)."""
        return set(self._slots) | set(self._members) | {FLEET_KEY}

    def objects(self, key: str) -> Mapping[tuple[str, str], Obj]:
        slots = self._slots.get(key)
        return MappingProxyType(slots.objects) if slots is not None else _EMPTY  # type: ignore[return-value]

    # -- derive ----------------------------------------------------------------------------

    def derive(
        self, keys: Iterable[str], *, now: dt.datetime, enough: Callable[[], bool] | None = None
    ) -> FleetUpdate:
        """Re-derive ``keys`` and publish a new version. With ``enough``, asked before each
        key but the first: once it says so, the keys not derived yet are returned as the update's ``left``
        (the caller derives them next), so that one call holds its caller for a bounded time
        (a new trust bundle re-judges every stored identity: thousands of keys)."""
        todo = dict.fromkeys(keys)
        changed: set[str] = set()
        had_pki = self._fleetwide.pki is not None
        if FLEET_KEY in todo:
            del todo[FLEET_KEY]
            before = self._fleetwide
            self._fleetwide = self._derive_fleetwide(now)
            changed.add(FLEET_KEY)
            if _trust(before) != _trust(self._fleetwide):
                # A new trust bundle: every stored identity is judged again.
                todo.update(dict.fromkeys(self._members))
            elif _per_cluster(before) != _per_cluster(self._fleetwide):
                # Every cluster's own objects carry it (its values' alertmanagerCount): each
                # cluster key is to be reconciled again, though its member is the same.
                changed |= {k for k, m in self._members.items() if m.cluster is not None}
            changed |= revocation.changed_clusters(before.revocations, self._fleetwide.revocations)
        ips: set[str] = set()
        members = self._members.mutate()
        order = list(todo)
        left: tuple[str, ...] = ()
        for i, key in enumerate(order):
            if i and enough is not None and enough():
                left = tuple(order[i:])
                break
            old = members.get(key)
            new = self._derive_member(key, old)
            changed.add(key)
            for m in (old, new):
                if m is not None and m.cluster is not None:
                    ips.add(m.cluster.external_ip)
            self._unclaim(old)
            if new is None:
                members.pop(key, None)
            else:
                members[key] = new
                self._claim(new)
        changed |= self._judge_ips(ips, members)
        self._members = members.finish()
        self._refresh_served(changed)
        self._number += 1
        pki = self._fleetwide.pki
        if (pki is not None) != had_pki:
            # The model shows the served clusters only with a whole PKI: all of them
            # appear (or go) with it, whichever key changed.
            changed |= set(self._served)
        self._model = Fleet(
            settings=self.settings,
            clusters=self._served if pki is not None else _EMPTY,
            alertmanagers=self._fleetwide.alertmanagers,
            pki=pki,
            identities=self._identities if pki is not None else _EMPTY,
            revocations=self._fleetwide.revocations,
        )
        version = FleetVersion(
            number=self._number,
            settings=self.settings,
            fleetwide=self._fleetwide,
            members=self._members,
            model=self._model,
        )
        return FleetUpdate(version=version, changed=frozenset(changed), left=left)

    def _derive_fleetwide(self, now: dt.datetime) -> FleetWide:
        ns = self.settings.namespace
        ca_secret: Obj | None = None
        secrets: dict[str, Obj] = {}
        ams: dict[str, Obj] = {}
        for (role, name), obj in self.objects(FLEET_KEY).items():
            if role == ALERTMANAGER_SERVICES:
                ams[name] = obj
            elif role == OWNED_SECRETS and name == labels.CA_SECRET:
                ca_secret = obj
            elif role == OWNED_SECRETS:
                secrets[name] = obj
        problems: list[Problem] = []
        ca = read_ca(ca_secret, now=now) if ca_secret is not None else None
        if ca_secret is not None and ca is None:
            problems.append(
                Problem(
                    source=ObjectRef(kind="Secret", name=labels.CA_SECRET, namespace=ns),
                    field="data",
                    message="ca.pem/ca-key.pem missing or not a PEM certificate",
                    reason="InvalidCA",
                )
            )
        atlas: Identity | None = None
        ads_server: CertKey | None = None
        certs: list[CertInfo] = []
        pki: PKI | None = None
        fraction = self.settings.renew_fraction
        if ca is not None:
            certs.append(
                CertInfo(
                    "ca",
                    not_after(ca.material.cert_pem),
                    renewal_time(ca.material.cert_pem, fraction),
                )
            )
            server = trusted_pair(
                secret_data(secrets.get(labels.SERVER_SECRET) or {}),
                "tls.crt",
                "tls.key",
                ca.trusted,
            )
            client = trusted_pair(
                secret_data(secrets.get(labels.CLIENT_SECRET) or {}),
                "tls.crt",
                "tls.key",
                ca.trusted,
            )
            if server is not None and client is not None:
                atlas = Identity(server=server, client=client)
                pki = PKI(
                    ca=ca.material,
                    trust_bundle=ca.bundle,
                    ca_serial=ca.serial,
                    ca_revision=ca.revision,
                    chain=ca.chain,
                )
                certs += _identity_certs(OBSERVABILITY_NODE, atlas, fraction)
            ads_server = trusted_pair(
                secret_data(secrets.get(labels.ADS_SECRET) or {}),
                "tls.crt",
                "tls.key",
                ca.trusted,
            )
            if ads_server is not None:
                certs.append(
                    CertInfo(
                        labels.ADS_SECRET,
                        not_after(ads_server.cert_pem),
                        renewal_time(ads_server.cert_pem, fraction),
                    )
                )
        alertmanagers = select_alertmanagers(
            [ams[n] for n in sorted(ams)], self.settings.alertmanager_selector
        )
        revoked = self._derive_revocations(secrets.get(labels.REVOCATIONS_SECRET), ca, now)
        problems += revoked[1]
        return FleetWide(
            ca_secret=ca_secret,
            secrets=_ro(secrets),
            alertmanager_services=_ro(ams),
            ca=ca,
            atlas_identity=atlas,
            ads_server=ads_server,
            alertmanagers=alertmanagers,
            pki=pki,
            problems=tuple(problems),
            certificates=tuple(certs),
            revocations=revoked[0],
        )

    def _derive_revocations(
        self, secret: Obj | None, ca: StoredCA | None, now: dt.datetime
    ) -> tuple[Mapping[str, Revocation], list[Problem]]:
        """The revocations in force (``atlasd.revocation``) and the entries skipped."""
        entries, skipped = revocation.parse(
            secret_data(secret).get(revocation.REVOCATIONS_KEY) if secret is not None else None
        )
        problems = [
            Problem(
                source=ObjectRef(
                    kind="Secret", name=labels.REVOCATIONS_SECRET, namespace=self.settings.namespace
                ),
                field="data",
                message=text,
                reason="InvalidRevocation",
            )
            for text in skipped
        ]
        in_force = tuple(sorted(e for e in entries if e.in_force(now)))
        inputs = (in_force, ca.material if ca is not None else None)
        if inputs != self._revoked[0]:
            made: Mapping[str, Revocation] = _EMPTY
            if in_force:
                made = _ro(
                    revocation.revocations(
                        in_force,
                        ca_cert_pem=ca.material.cert_pem if ca is not None else b"",
                        ca_key_pem=ca.material.key_pem if ca is not None else b"",
                        now=now,
                    )
                )
            self._revoked = (inputs, made)
        return self._revoked[1], problems

    def _derive_member(self, key: str, old: Member | None) -> Member | None:
        objs = self.objects(key)
        if not objs:
            return None
        service: Obj | None = None
        services: dict[str, Obj] = {}
        secrets: dict[str, Obj] = {}
        for (role, name), obj in objs.items():
            if role == CLUSTER_SERVICES:
                service = obj
            elif role == OWNED_SERVICES:
                services[name] = obj
            elif role == OWNED_SECRETS:
                secrets[name] = obj
        settings = self.settings
        # The stored identity: it settles an unannotated cluster's mode (enrollment_mode).
        ident_secret = secrets.get(identity_secret_name(key))
        svc_rv = bodies.resource_version(service)
        cluster: DownstreamCluster | None = None
        own_problems: tuple[Problem, ...] = ()
        state: MemberState = "absent"
        if service is not None:
            if not is_cluster_service(service):
                # Not labelled exactly "true": absent (what atlasd made for it goes),
                # with the Problem that says so when the label has another value.
                label_problem = cluster_label_problem(service, settings)
                own_problems = (label_problem,) if label_problem is not None else ()
            elif (
                old is not None and old.service is not None and old.service_rv == svc_rv and svc_rv
            ):
                cluster, own_problems = old.cluster, old.own_problems
                state = "invalid" if own_problems else "pending"
            else:
                result = validate_cluster(service, settings, allow_loopback=self.allow_loopback)
                if isinstance(result, list):
                    own_problems = tuple(result)
                    state = "invalid"
                else:
                    cluster = result
                    state = "pending"
        if cluster is not None:
            cluster = enrollment_mode(cluster, settings, identity_stored=ident_secret is not None)
        enrolled = cluster is not None and cluster.enrolled
        # The stored identity, judged against the current trust bundle; an enrolled
        # cluster has none (one still stored is the reconciler's to delete).
        ident_rv = bodies.resource_version(ident_secret) if not enrolled else ""
        trust = _trust(self._fleetwide)
        identity: Identity | None = None
        certs: tuple[CertInfo, ...] = ()
        if (
            not enrolled
            and old is not None
            and old.identity is not None
            and old.identity_rv == ident_rv
            and old.trust == trust
            and ident_rv
        ):
            identity, certs = old.identity, old.certificates
        elif not enrolled and ident_secret is not None and self._fleetwide.ca is not None:
            data = secret_data(ident_secret)
            trusted = self._fleetwide.ca.trusted
            s = trusted_pair(data, "server.crt", "server.key", trusted)
            c = trusted_pair(data, "client.crt", "client.key", trusted)
            if s is not None and c is not None:
                identity = Identity(server=s, client=c)
                certs = tuple(_identity_certs(key, identity, settings.renew_fraction))
        if state == "pending" and (identity is not None or enrolled):
            state = "served"
        return Member(
            name=key,
            service=service,
            services=_ro(services),
            secrets=_ro(secrets),
            cluster=cluster,
            problems=own_problems,
            identity=identity,
            certificates=certs,
            state=state,
            service_rv=svc_rv,
            identity_rv=ident_rv,
            trust=trust,
            own_problems=own_problems,
        )

    # -- the external-IP rule ----------------------------------------------------------------

    def _claim(self, m: Member) -> None:
        if m.cluster is not None:
            self._claims.setdefault(m.cluster.external_ip, set()).add(m.name)

    def _unclaim(self, m: Member | None) -> None:
        if m is None or m.cluster is None:
            return
        names = self._claims.get(m.cluster.external_ip)
        if names is not None:
            names.discard(m.name)
            if not names:
                del self._claims[m.cluster.external_ip]

    def _judge_ips(self, ips: set[str], members: immutables.MapMutation[str, Member]) -> set[str]:
        """Give each IP in ``ips`` to its oldest claimant; returns the members re-judged."""
        touched: set[str] = set()
        for ip in ips:
            names = self._claims.get(ip, set())
            if not names:
                continue
            winner = min(names, key=lambda n: age_key(members[n].service or {}))
            for n in names:
                m = members[n]
                want = self._judged(m, winner if n != winner else None)
                if want is not m:
                    members[n] = want
                    touched.add(n)
        return touched

    def _judged(self, m: Member, holder: str | None) -> Member:
        """``m`` with the duplicate-IP verdict applied (``holder``: who owns its IP)."""
        if m.cluster is None:
            return m
        if holder is None:
            state: MemberState = "served" if m.is_servable else "pending"
            problems = m.own_problems
        else:
            state = "invalid"
            problems = (
                *m.own_problems,
                Problem(
                    source=m.cluster.source or source_ref(m.service or {}, self.settings),
                    field="spec.externalIPs[0]",
                    message=f"{m.cluster.external_ip} is already used by cluster {holder!r}",
                ),
            )
        if state == m.state and problems == m.problems:
            return m
        return replace(m, state=state, problems=problems)

    def _refresh_served(self, keys: set[str]) -> None:
        served = self._served.mutate()
        identities = self._identities.mutate()
        for key in keys:
            if key == FLEET_KEY:
                continue
            m = self._members.get(key)
            if m is not None and m.state == "served" and m.cluster is not None and m.is_servable:
                if served.get(key) is not m.cluster:
                    served[key] = m.cluster
                if m.identity is None:
                    identities.pop(key, None)  # enrolled: its keys are its agent's
                elif identities.get(key) is not m.identity:
                    identities[key] = m.identity
            else:
                served.pop(key, None)
                identities.pop(key, None)
        atlas = self._fleetwide.atlas_identity
        if atlas is not None:
            if identities.get(OBSERVABILITY_NODE) is not atlas:
                identities[OBSERVABILITY_NODE] = atlas
        else:
            identities.pop(OBSERVABILITY_NODE, None)
        self._served, self._identities = served.finish(), identities.finish()


def _trust(fw: FleetWide) -> bytes:
    return fw.ca.bundle if fw.ca is not None else b""


def _per_cluster(fw: FleetWide) -> int:
    """What of the fleet-wide key goes into each cluster's own objects: the number of local
    Alertmanagers (``atlas.alertmanagerCount`` in its ``<c>-envoy-values``)."""
    return len(fw.alertmanagers)


def _identity_certs(node: str, identity: Identity, fraction: float) -> list[CertInfo]:
    return [
        CertInfo(f"{node}/{kind}", not_after(ck.cert_pem), renewal_time(ck.cert_pem, fraction))
        for kind, ck in (("server", identity.server), ("client", identity.client))
    ]


def fleet_of(
    *,
    services: Iterable[Obj],
    secrets: Iterable[Obj],
    settings: Settings,
    now: dt.datetime,
    allow_loopback: bool = False,
) -> FleetVersion:
    """One version from plain object lists (the CLI, tests, one-shot passes): each object
    is recorded under every role whose selector it matches."""
    from atlasd.fleet.keys import roles
    from atlasd.kube.selectors import object_matches

    state = FleetState(settings, allow_loopback=allow_loopback)
    rs = roles(settings)
    for kind, items in (("Service", services), ("Secret", secrets)):
        for obj in items:
            for role in rs:
                if role.resource.kind == kind and object_matches(obj, role.selector):
                    state.observe(role.name, bodies.name(obj), obj)
    return state.derive(state.keys(), now=now).version
