"""The PKI: which CA and which leaf certificates should exist, decided purely.

``plan_pki(secrets=..., clusters=..., settings=..., now=..., keys=...)`` takes the observed
Secrets (name -> object) and returns a ``PKIPlan``: the desired Secrets and the
``model.PKI`` the xDS side builds Envoy configuration from. Nothing here does I/O; the only
source of randomness (private keys and serial numbers) is the injectable ``KeySource``, and
ECDSA signatures are deterministic (RFC 6979), so a plan is a function of its inputs.
Certificates are made and checked by ``atlasd.reconcile.certs``; this module decides.

CA (Secret ``atlas-ca``: ``ca.pem``, ``ca-key.pem``, earlier CAs as ``ca-<serial>.pem``;
labels ``goatlas.io/ca: "true"``, ``goatlas.io/ca-revision``, ``goatlas.io/ca-serial``):

- absent: a new ECDSA P-256 CA, revision 1;
- present: adopted as is, whatever its key type — notably the original's RSA-4096 CA with a
  PKCS#1 ``RSA PRIVATE KEY`` — and used to sign; never replaced. If it cannot be parsed or
  its key does not match its certificate, ``PKIError`` is raised and nothing is replaced;
- annotated ``goatlas.io/ca-rotate`` (any value), expired, or past ``renew_fraction`` of its
  lifetime: rotated — a new CA with the old one's name, the old one kept as
  ``ca-<old serial>.pem`` so the trust bundle overlaps both, the link ``ca-cross-<old
  serial>.pem`` (the new CA cross-signed by the old one, ``certs.cross_sign``) so that a
  peer trusting only the old CA verifies what the new one signs, revision bumped, the
  annotation removed, every leaf re-issued. Earlier CAs and their links are dropped once
  they expire, when an operator deletes ``ca-<serial>.pem``, or once ``EARLIER_KEPT``
  newer earlier CAs are kept (``atlasd.fleet.trust``).

Serials are decimal (``str(cert.serial_number)``, like Go's ``big.Int.String()``).

Leaves (ECDSA P-256, random unique serials, SHA-256, validity capped at the CA's) are
re-issued when missing or unparsable, when revoked (their SHA-256 is among a cluster's
revoked hashes, ``atlasd.revocation``), when their key does not match or is not ECDSA P-256
(so the original's RSA leaves are replaced once, at adoption), when not signed by the
current CA, when their SANs or usages differ from the scheme below, or once
``renew_fraction`` of their lifetime has passed. Otherwise they are reused byte for byte, so
a restart re-issues nothing.

SAN scheme (``<ns>`` = settings.namespace):

- observability node ``atlas``: DNS ``atlas`` and ``atlas.<ns>.atlas``; ``atlas-server``
  and ``atlas-tls`` also carry ``settings.envoy_ads_address`` and ``settings.envoy_address``
  (IP SANs for IP literals, DNS SANs otherwise) so clients checking the dialled host pass.
  ``atlas-server`` (serverAuth) and ``atlas-client`` (clientAuth) form identity ``atlas``;
  ``atlas-tls`` (both usages) is kept for the original's ingress.
- atlasd's ADS server (Secret ``atlasd-ads``, serverAuth): DNS ``model.ADS_SERVER_NAME``
  (which the observability Envoy pins) and ``settings.atlasd_ads_host`` (IP or DNS).
- downstream cluster ``<c>``: DNS ``<c>`` and ``<c>.<ns>.atlas``, one server certificate
  (serverAuth) and one client certificate (clientAuth), stored in Secret
  ``<c>-atlas-identity`` (``ca.crt``, ``server.crt``, ``server.key``, ``client.crt``,
  ``client.key``) from which a restart reloads them, and copied into ``<c>-envoy-values``.
  Peers pin the SAN DNS name ``<c>`` (cluster identity) or ``atlas`` (observability).
  An enrolled cluster (``DownstreamCluster.enrolled``) gets none of these: its agent makes
  its keys and the enrollment endpoint signs its requests (``atlasd.enroll``).

Errors::

    PKIError   the existing CA Secret is unusable (reported, never "repaired" by replacing it)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from atlasd import labels
from atlasd.addresses import AddressError, parse_ip
from atlasd.certpolicy import (
    is_due,
    key_belongs_to,
    load_cert,
    load_key,
    renew_at,
    renewal_offset,
)
from atlasd.fleet.trust import (
    CA_CERT_KEY,
    CA_KEY_KEY,
    EARLIER_KEPT,
    StoredCA,
    link_key,
    order_previous,
    previous_key,
    read_ca,
    stored_pair,
)
from atlasd.kube.secrets import secret_data
from atlasd.model import (
    ADS_SERVER_NAME,
    OBSERVABILITY_NODE,
    PKI,
    CertKey,
    DownstreamCluster,
    Identity,
    Settings,
)
from atlasd.reconcile.certs import (
    CA,
    CLOCK_SKEW,
    KeySource,
    LeafSpec,
    RandomKeys,
    as_utc,
    cross_sign,
    issue_leaf,
    key_pem,
    leaf_is_current,
    new_ca,
)
from atlasd.reconcile.objects import (
    SecretObject,
    managed_labels,
    meta_map,
    owner_references,
    secret_object,
)
from atlasd.revocation import fingerprint

# Re-exported: callers plan with ``pki`` alone (``plan_pki(..., keys=RandomKeys())``).
__all__ = [
    "CA",
    "CA_CERT_KEY",
    "CA_KEY_KEY",
    "KeySource",
    "LeafPlan",
    "LeafSpec",
    "PKIError",
    "PKIPlan",
    "RandomKeys",
    "ca_secret",
    "check_settings",
    "cluster_specs",
    "decide_ca",
    "observability_specs",
    "plan_identity",
    "plan_observability",
    "plan_pki",
    "signing_ca",
]

CAAction = Literal["created", "adopted", "kept", "rotated"]


class PKIError(Exception):
    """The existing ``atlas-ca`` Secret cannot be used (message never contains key data)."""


@dataclass(frozen=True)
class PKIPlan:
    """The outcome of ``plan_pki``: desired Secrets and the PKI handed to xDS."""

    pki: PKI
    ca: CA
    ca_action: CAAction
    ca_secret: SecretObject
    # atlas-server, atlas-client, atlas-tls, atlasd-ads
    tls_secrets: tuple[SecretObject, ...]
    # node id (``atlas`` and each cluster) -> its certificates
    identities: Mapping[str, Identity]
    # cluster name -> <cluster>-atlas-identity
    identity_secrets: Mapping[str, SecretObject]
    # Names of the certificates issued by this plan ("atlas-server", "<c>/client", ...).
    issued: tuple[str, ...]
    # When the next pass must run at the latest for a time-based change: a leaf or the CA
    # reaching ``renew_fraction``, or an earlier CA leaving the bundle at its expiry.
    next_renewal: dt.datetime | None = None
    # atlasd's ADS server certificate (Secret atlasd-ads).
    ads_server: CertKey | None = None


def _address_san(address: str) -> tuple[str | None, str | None]:
    """(dns, ip) for a settings address; an empty address gives neither."""
    if not address:
        return None, None
    try:
        return None, str(parse_ip(address))
    except AddressError:
        return address, None


def observability_specs(settings: Settings) -> dict[str, LeafSpec]:
    """The cluster-wide leaves, by Secret name."""
    ns = settings.namespace
    base = (OBSERVABILITY_NODE, f"{OBSERVABILITY_NODE}.{ns}.atlas")
    dns: list[str] = list(base)
    ips: list[str] = []
    for addr in (settings.envoy_ads_address, settings.envoy_address):
        d, i = _address_san(addr)
        if d and d not in dns:
            dns.append(d)
        if i and i not in ips:
            ips.append(i)
    ads_dns, ads_ip = _address_san(settings.atlasd_ads_host)
    return {
        labels.SERVER_SECRET: LeafSpec(OBSERVABILITY_NODE, tuple(dns), tuple(ips), "server"),
        labels.CLIENT_SECRET: LeafSpec(OBSERVABILITY_NODE, base, (), "client"),
        labels.TLS_SECRET: LeafSpec(OBSERVABILITY_NODE, tuple(dns), tuple(ips), "both"),
        labels.ADS_SECRET: LeafSpec(
            labels.ADS_SECRET,
            (ADS_SERVER_NAME, *([ads_dns] if ads_dns and ads_dns != ADS_SERVER_NAME else [])),
            (ads_ip,) if ads_ip else (),
            "server",
        ),
    }


def cluster_specs(cluster: str, settings: Settings) -> tuple[LeafSpec, LeafSpec]:
    """(server, client) leaves of one downstream cluster."""
    dns = (cluster, f"{cluster}.{settings.namespace}.atlas")
    return LeafSpec(cluster, dns, (), "server"), LeafSpec(cluster, dns, (), "client")


def signing_ca(stored: StoredCA) -> CA:
    """The stored CA (``atlasd.fleet.trust.read_ca``) with its key, which must belong to the
    certificate (any key type cryptography signs with; PKCS#1 or PKCS#8 PEM)."""
    key = load_key(stored.material.key_pem)
    if key is None:
        raise PKIError(f"{CA_KEY_KEY} is not an unencrypted PEM private key")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) or not key_belongs_to(
        key, stored.cert
    ):
        raise PKIError(f"{CA_KEY_KEY} does not belong to the certificate in {CA_CERT_KEY}")
    return CA(
        cert=stored.cert,
        key=key,
        material=stored.material,
        revision=stored.revision,
        previous=stored.previous,
        links=stored.links,
    )


def decide_ca(
    observed: Mapping[str, Any] | None,
    *,
    settings: Settings,
    now: dt.datetime,
    keys: KeySource,
) -> tuple[CA, CAAction]:
    """Create, adopt, keep or rotate the CA (see module docstring)."""
    now = as_utc(now)
    data = secret_data(observed)
    lbls = meta_map(observed, "labels")
    anns = meta_map(observed, "annotations")
    if CA_CERT_KEY not in data or CA_KEY_KEY not in data:
        if observed is not None and (CA_CERT_KEY in data or CA_KEY_KEY in data):
            raise PKIError(f"atlas-ca holds only one of {CA_CERT_KEY} and {CA_KEY_KEY}")
        cert, key = new_ca(keys=keys, now=now, lifetime=settings.ca_lifetime)
        material = CertKey(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))
        return CA(cert=cert, key=key, material=material, revision=1), "created"

    stored = read_ca(observed, now=now)
    if stored is None:
        raise PKIError(f"{CA_CERT_KEY} is not a PEM certificate")
    current = signing_ca(stored)
    rotate = labels.CA_ROTATE_ANNOTATION in anns or is_due(
        stored.cert, now, settings.renew_fraction
    )
    if not rotate:
        owned = lbls.get(labels.MANAGED_BY_LABEL) == labels.MANAGED_BY_VALUE
        return current, ("kept" if owned else "adopted")

    # The new CA takes the old one's name, so the link below is self-issued (certs).
    cert = stored.cert
    new_cert, new_key = new_ca(keys=keys, now=now, lifetime=settings.ca_lifetime, name=cert.subject)
    links: tuple[tuple[str, bytes], ...] = ()
    previous = stored.earlier
    if cert.not_valid_after_utc > now:
        # An expired CA is neither kept nor linked (nothing would verify through it).
        link = cross_sign(new_cert, issuer=cert, issuer_key=current.key, keys=keys, now=now)
        links = ((stored.serial, link.public_bytes(serialization.Encoding.PEM)), *stored.links)
        previous = [(stored.serial, stored.material.cert_pem, cert), *previous]
    # The oldest past EARLIER_KEPT leave the bundle, and their links with them.
    kept = order_previous(previous)[:EARLIER_KEPT]
    serials = {serial for serial, _, _ in kept}
    material = CertKey(new_cert.public_bytes(serialization.Encoding.PEM), key_pem(new_key))
    ca = CA(
        cert=new_cert,
        key=new_key,
        material=material,
        revision=stored.revision + 1,
        previous=tuple((serial, pem) for serial, pem, _ in kept),
        links=tuple(link for link in links if link[0] in serials),
    )
    return ca, "rotated"


def ca_secret(ca: CA, observed: Mapping[str, Any] | None, settings: Settings) -> SecretObject:
    """Desired ``atlas-ca``: observed labels/annotations kept except ``ca-rotate``; keys
    that are not ours (not ``ca*.pem``) are kept too, so adopting changes no foreign data."""
    data = {
        k: v
        for k, v in secret_data(observed).items()
        if not (k.startswith("ca") and k.endswith(".pem"))
    }
    data[CA_CERT_KEY] = ca.material.cert_pem
    data[CA_KEY_KEY] = ca.material.key_pem
    for serial, pem in ca.previous:
        data[previous_key(serial)] = pem
    for serial, pem in ca.links:
        data[link_key(serial)] = pem
    obj_labels = meta_map(observed, "labels")
    obj_labels.update(
        managed_labels(
            **{
                labels.CA_LABEL: "true",
                labels.CA_REVISION_LABEL: str(ca.revision),
                labels.CA_SERIAL_LABEL: ca.serial,
            }
        )
    )
    anns = meta_map(observed, "annotations")
    anns.pop(labels.CA_ROTATE_ANNOTATION, None)
    return secret_object(
        name=labels.CA_SECRET,
        namespace=settings.namespace,
        data=data,
        obj_labels=obj_labels,
        annotations=anns,
        secret_type=str((observed or {}).get("type") or "Opaque"),
    )


def check_settings(settings: Settings) -> None:
    """Raise ``ValueError`` for settings that would re-issue on every pass (a configuration
    error, caught at startup)."""
    if not 0 < settings.renew_fraction <= 1:
        raise ValueError(f"renew_fraction must be in (0, 1], not {settings.renew_fraction}")
    for what, life in (
        ("leaf_lifetime", settings.leaf_lifetime),
        ("ca_lifetime", settings.ca_lifetime),
    ):
        # Certificates are back-dated by CLOCK_SKEW: a fresh one must not be due already.
        if renewal_offset(life + CLOCK_SKEW, settings.renew_fraction) <= CLOCK_SKEW:
            raise ValueError(f"{what} {life} is too short to renew at {settings.renew_fraction}")


@dataclass(frozen=True)
class LeafPlan:
    """The leaves of one node: kept or issued, the Secrets holding them, when to renew."""

    identity: Identity
    secrets: tuple[SecretObject, ...]
    issued: tuple[str, ...]
    next_renewal: dt.datetime
    # The observability plan only: atlasd's ADS server certificate.
    ads_server: CertKey | None = None
    # Of ``issued``, the leaves replaced because they were revoked, with the old serial.
    revoked: tuple[tuple[str, int], ...] = ()


class _Leaves:
    """Keeps or issues leaves under one CA, noting what it issued (and why: revoked)."""

    def __init__(
        self,
        *,
        ca: CA,
        settings: Settings,
        now: dt.datetime,
        keys: KeySource,
        force: bool,
        revoked: frozenset[str] = frozenset(),
    ) -> None:
        self.ca, self.settings, self.now, self.keys, self.force = ca, settings, now, keys, force
        self.revoked_hashes = revoked
        self.issued: list[str] = []
        self.revoked: list[tuple[str, int]] = []

    def leaf(self, name: str, current: CertKey | None, spec: LeafSpec) -> CertKey:
        s = self.settings
        if current is not None and self.revoked_hashes:
            cert = load_cert(current.cert_pem)
            if cert is not None and fingerprint(cert) in self.revoked_hashes:
                self.revoked.append((name, cert.serial_number))
                current = None
        if (
            current is not None
            and not self.force
            and leaf_is_current(
                current, spec, ca=self.ca, now=self.now, renew_fraction=s.renew_fraction
            )
        ):
            return current
        self.issued.append(name)
        return issue_leaf(spec, ca=self.ca, keys=self.keys, now=self.now, lifetime=s.leaf_lifetime)


def plan_observability(
    secrets: Mapping[str, Mapping[str, Any]],
    *,
    ca: CA,
    settings: Settings,
    now: dt.datetime,
    keys: KeySource,
    force: bool = False,
) -> LeafPlan:
    """``atlas-server``, ``atlas-client``, ``atlas-tls`` and ``atlasd-ads`` (observed by name
    in ``secrets``); ``force`` re-issues them all (the CA was just rotated)."""
    leaves = _Leaves(ca=ca, settings=settings, now=as_utc(now), keys=keys, force=force)
    tls: dict[str, CertKey] = {}
    out: list[SecretObject] = []
    for name, spec in observability_specs(settings).items():
        observed = secrets.get(name)
        material = leaves.leaf(name, stored_pair(secret_data(observed), "tls.crt", "tls.key"), spec)
        tls[name] = material
        obj_labels = meta_map(observed, "labels")
        obj_labels.update(
            managed_labels(**{labels.CERT_LABEL: "true", labels.CA_SIGNED_LABEL: ca.serial})
        )
        out.append(
            secret_object(
                name=name,
                namespace=settings.namespace,
                data={
                    "ca.crt": ca.bundle,
                    "tls.crt": material.cert_pem,
                    "tls.key": material.key_pem,
                },
                obj_labels=obj_labels,
                secret_type=str((observed or {}).get("type") or "kubernetes.io/tls"),
            )
        )
    identity = Identity(server=tls[labels.SERVER_SECRET], client=tls[labels.CLIENT_SECRET])
    renewals = [renew_at(m.cert_pem, settings.renew_fraction) for m in tls.values()]
    return LeafPlan(
        identity=identity,
        secrets=tuple(out),
        issued=tuple(leaves.issued),
        next_renewal=min(renewals),
        ads_server=tls[labels.ADS_SECRET],
    )


def plan_identity(
    cluster: DownstreamCluster,
    observed: Mapping[str, Any] | None,
    *,
    ca: CA,
    settings: Settings,
    now: dt.datetime,
    keys: KeySource,
    force: bool = False,
    revoked: frozenset[str] = frozenset(),
) -> LeafPlan:
    """One downstream cluster's server and client leaves and ``<c>-atlas-identity`` (a
    cluster in the compatible mode; an enrolled one has none); ``revoked``: the cluster's revoked certificate hashes (a stored leaf among them is
    re-issued)."""
    leaves = _Leaves(
        ca=ca, settings=settings, now=as_utc(now), keys=keys, force=force, revoked=revoked
    )
    data = secret_data(observed)
    server_spec, client_spec = cluster_specs(cluster.name, settings)
    server = leaves.leaf(
        f"{cluster.name}/server", stored_pair(data, "server.crt", "server.key"), server_spec
    )
    client = leaves.leaf(
        f"{cluster.name}/client", stored_pair(data, "client.crt", "client.key"), client_spec
    )
    secret = secret_object(
        name=labels.identity_secret_name(cluster.name),
        namespace=settings.namespace,
        data={
            "ca.crt": ca.bundle,
            "server.crt": server.cert_pem,
            "server.key": server.key_pem,
            "client.crt": client.cert_pem,
            "client.key": client.key_pem,
        },
        obj_labels=managed_labels(
            cluster.name,
            **{labels.CERT_LABEL: "identity", labels.CA_SIGNED_LABEL: ca.serial},
        ),
        owner_refs=owner_references(cluster),
    )
    return LeafPlan(
        identity=Identity(server=server, client=client),
        secrets=(secret,),
        issued=tuple(leaves.issued),
        next_renewal=min(
            renew_at(server.cert_pem, settings.renew_fraction),
            renew_at(client.cert_pem, settings.renew_fraction),
        ),
        revoked=tuple(leaves.revoked),
    )


def ca_deadline(ca: CA, settings: Settings) -> dt.datetime:
    """When the fleet-wide key must be looked at again for time's sake: the CA reaching
    ``renew_fraction``, or an earlier CA leaving the bundle at its expiry."""
    deadlines = [renew_at(ca.material.cert_pem, settings.renew_fraction)]
    deadlines += [renew_at(pem, 1.0) for _, pem in ca.previous]
    return min(deadlines)


def plan_pki(
    *,
    secrets: Mapping[str, Mapping[str, Any]],
    clusters: Iterable[DownstreamCluster],
    settings: Settings,
    now: dt.datetime,
    keys: KeySource,
) -> PKIPlan:
    """Decide the CA and every leaf of a whole fleet at once from the observed Secrets
    (name -> object): ``decide_ca``, ``plan_observability`` and ``plan_identity`` composed
    (the daemon runs the same steps key by key).

    Raises ``PKIError`` when ``atlas-ca`` exists but is unusable, ``ValueError`` when the
    settings would re-issue on every pass.
    """
    check_settings(settings)
    now = as_utc(now)
    ca, action = decide_ca(secrets.get(labels.CA_SECRET), settings=settings, now=now, keys=keys)
    # A rotation re-issues every leaf, even one the new CA would verify (same key reused).
    force = action == "rotated"
    obs = plan_observability(secrets, ca=ca, settings=settings, now=now, keys=keys, force=force)
    issued = list(obs.issued)
    deadlines = [obs.next_renewal, ca_deadline(ca, settings)]
    identities: dict[str, Identity] = {OBSERVABILITY_NODE: obs.identity}
    identity_secrets: dict[str, SecretObject] = {}
    for cluster in sorted(clusters, key=lambda c: c.name):
        if cluster.enrolled:
            continue  # its keys stay home: atlasd makes none
        plan = plan_identity(
            cluster,
            secrets.get(labels.identity_secret_name(cluster.name)),
            ca=ca,
            settings=settings,
            now=now,
            keys=keys,
            force=force,
        )
        issued += plan.issued
        deadlines.append(plan.next_renewal)
        identities[cluster.name] = plan.identity
        identity_secrets[cluster.name] = plan.secrets[0]
    return PKIPlan(
        pki=ca.pki,
        ca=ca,
        ca_action=action,
        ca_secret=ca_secret(ca, secrets.get(labels.CA_SECRET), settings),
        tls_secrets=obs.secrets,
        identities=identities,
        identity_secrets=identity_secrets,
        issued=tuple(issued),
        next_renewal=min(deadlines),
        ads_server=obs.ads_server,
    )
