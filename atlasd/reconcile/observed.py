"""The fleet as Kubernetes already holds it: what every replica serves.

The leader writes (``atlasd.reconcile.applier``); every replica — the leader included —
derives the Fleet its xDS server and zone writer use from its own watch cache with
``observed_fleet``, reading the PKI the leader stored and issuing nothing. Data thus
flows one way (watch -> observed -> fleet -> xDS/DNS) and all replicas agree on what
they serve.

A valid cluster whose identity Secret (``<cluster>-atlas-identity``) does not exist yet,
or whose certificates there are not signed by a CA in the trust bundle, is *pending*:
left out of the fleet until the leader has issued it (normally within one pass).
Without a usable ``atlas-ca`` there is no PKI and the fleet has no clusters.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from atlasd import labels
from atlasd.model import (
    OBSERVABILITY_NODE,
    PKI,
    CertKey,
    DownstreamCluster,
    Fleet,
    Identity,
    Problem,
    Settings,
)
from atlasd.reconcile.objects import secret_data
from atlasd.reconcile.pki import CA_CERT_KEY, CA_KEY_KEY, _order_previous, _previous_cas
from atlasd.reconcile.validate import identity_secret_name, select_alertmanagers, validate_all


@dataclass(frozen=True)
class ObservedFleet:
    """The fleet to serve, the input problems, and the clusters still pending issue."""

    fleet: Fleet
    problems: tuple[Problem, ...]
    pending: tuple[str, ...]


@functools.lru_cache(maxsize=8192)
def _signed_by_any(cert_pem: bytes, bundle: tuple[bytes, ...]) -> bool:
    """Whether ``cert_pem`` was issued by one of the CAs in ``bundle``.

    Memoized: a pure function of its bytes, and re-verifying every stored leaf (two ECDSA
    verifications per cluster) on every watch event dominated the fleet pass at 1,000
    clusters (bench/README.md). Bounded, so removed clusters' entries age out.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    for ca_pem in bundle:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def load_pki(
    secrets: Mapping[str, Mapping[str, Any]],
    clusters: Iterable[DownstreamCluster],
    *,
    now: dt.datetime,
) -> tuple[PKI | None, tuple[str, ...]]:
    """The stored PKI (identities of ``atlas`` and of each issued cluster) and the
    names of clusters still pending."""
    ca_data = secret_data(secrets.get(labels.CA_SECRET))
    names = [c.name for c in clusters]
    if CA_CERT_KEY not in ca_data or CA_KEY_KEY not in ca_data:
        return None, tuple(names)
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_data[CA_CERT_KEY])
    except ValueError:
        return None, tuple(names)
    serial = str(ca_cert.serial_number)
    previous = _order_previous(_previous_cas(ca_data, serial, now))
    bundle_pem = ca_data[CA_CERT_KEY] + b"".join(pem for _, pem in previous)
    trusted = (ca_data[CA_CERT_KEY], *(pem for _, pem in previous))
    revision_text = (
        (secrets[labels.CA_SECRET].get("metadata") or {})
        .get("labels", {})
        .get(labels.CA_REVISION_LABEL, "1")
    )
    revision = int(revision_text) if str(revision_text).isdigit() else 1

    def pair(name: str, cert_key: str, key_key: str) -> CertKey | None:
        data = secret_data(secrets.get(name))
        if cert_key in data and key_key in data and _signed_by_any(data[cert_key], trusted):
            return CertKey(data[cert_key], data[key_key])
        return None

    identities: list[tuple[str, Identity]] = []
    server = pair(labels.SERVER_SECRET, "tls.crt", "tls.key")
    client = pair(labels.CLIENT_SECRET, "tls.crt", "tls.key")
    if server is None or client is None:
        return None, tuple(names)
    identities.append((OBSERVABILITY_NODE, Identity(server=server, client=client)))
    pending: list[str] = []
    for name in names:
        sname = identity_secret_name(name)
        s = pair(sname, "server.crt", "server.key")
        c = pair(sname, "client.crt", "client.key")
        if s is None or c is None:
            pending.append(name)
        else:
            identities.append((name, Identity(server=s, client=c)))
    pki = PKI(
        ca=CertKey(ca_data[CA_CERT_KEY], ca_data[CA_KEY_KEY]),
        trust_bundle=bundle_pem,
        ca_serial=serial,
        ca_revision=revision,
        identities=tuple(identities),
    )
    return pki, tuple(pending)


def observed_fleet(
    *,
    services: Iterable[Mapping[str, Any]],
    secrets: Mapping[str, Mapping[str, Any]],
    settings: Settings,
    now: dt.datetime,
    allow_loopback: bool = False,
) -> ObservedFleet:
    """Validate the cluster Services and attach the stored PKI; issue nothing."""
    services = list(services)
    clusters, problems = validate_all(services, settings, allow_loopback=allow_loopback)
    alertmanagers = select_alertmanagers(services, settings.alertmanager_selector)
    pki, pending = load_pki(secrets, clusters, now=now)
    ready = tuple(c for c in clusters if c.name not in pending) if pki is not None else ()
    return ObservedFleet(
        fleet=Fleet(settings=settings, clusters=ready, alertmanagers=alertmanagers, pki=pki),
        problems=problems,
        pending=pending,
    )
