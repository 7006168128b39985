"""Revoked certificates: what is revoked, where it is stored, and the CRL that says so.

A revocation names one certificate, not a key or a cluster: ``Revoked`` holds the cluster
it was issued to, which of its leaves (``server``/``client``), its serial, the SHA-256 of
its DER (what Envoy's ``x-forwarded-client-cert`` calls ``Hash``), its notAfter and when
it was revoked. Entries are stored as JSON under key ``revocations.json`` of the Secret
``atlas-revocations`` (``labels.REVOCATIONS_SECRET``, labelled managed-by atlasd so every
replica watches it): it survives restarts, every replica reads the same list, and removing
a cluster keeps its entries, so a cluster re-added under the same name does not make a
leaked certificate good again. An entry is kept until its certificate's notAfter: past
it, the certificate is refused for being expired and the entry is dropped (by readers at
once, from the Secret at the next write).

Readers (``atlasd.fleet``) turn the entries in force into a ``model.Revocation`` per
cluster: the hashes (atlasd's ADS authorizer refuses a stream whose client certificate has
one; the reconciler re-issues a stored leaf that has one) and a CRL signed by the current
CA listing the serials (the observability Envoy's upstream TLS context of that cluster
carries it, so the cluster's revoked server certificate fails the handshake).
``sign_crl`` is deterministic (RFC 6979 ECDSA; thisUpdate is the newest revocation time,
nextUpdate the CA's notAfter), so every replica serves the same bytes and the same xDS
version.

Writers (``atlasd cluster revoke``; later the enrollment endpoint's ``--rekey``) add
entries with ``merge``, which also drops the expired ones.

Pure: ``cryptography`` and the standard library; nothing here logs a certificate's body.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from atlasd.certpolicy import load_cert, load_key
from atlasd.model import Revocation
from atlasd.times import parse_rfc3339, rfc3339

REVOCATIONS_KEY = "revocations.json"
"""The data key of the ``atlas-revocations`` Secret holding the entries."""

Kind = Literal["server", "client"]
KINDS: tuple[Kind, ...] = ("server", "client")


@dataclass(frozen=True, order=True)
class Revoked:
    """One revoked certificate (no key material: a serial and a hash)."""

    cluster: str
    kind: Kind
    serial: int
    sha256: str  # lowercase hex of the DER certificate's SHA-256
    not_after: dt.datetime
    revoked_at: dt.datetime

    def in_force(self, now: dt.datetime) -> bool:
        return now < self.not_after

    def doc(self) -> dict[str, str]:
        return {
            "cluster": self.cluster,
            "kind": self.kind,
            "serial": str(self.serial),
            "sha256": self.sha256,
            "notAfter": rfc3339(self.not_after),
            "revokedAt": rfc3339(self.revoked_at),
        }


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex (Envoy's XFCC ``Hash``)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem_fingerprint(cert_pem: bytes) -> str | None:
    """``fingerprint`` of the first certificate of ``cert_pem`` (None if it does not parse)."""
    cert = load_cert(cert_pem)
    return None if cert is None else fingerprint(cert)


def revoke(cluster: str, kind: Kind, cert_pem: bytes, *, now: dt.datetime) -> Revoked:
    """The entry revoking ``cert_pem`` (raises ``ValueError`` if it is not a certificate)."""
    cert = load_cert(cert_pem)
    if cert is None:
        raise ValueError(f"the {kind} certificate of cluster {cluster!r} does not parse")
    return Revoked(
        cluster=cluster,
        kind=kind,
        serial=cert.serial_number,
        sha256=fingerprint(cert),
        not_after=cert.not_valid_after_utc,
        revoked_at=now.astimezone(dt.UTC).replace(microsecond=0),
    )


def parse(data: bytes | None) -> tuple[list[Revoked], list[str]]:
    """The entries of ``revocations.json`` and what is wrong with those that are skipped
    (each problem names the entry's index and field, never more of its content)."""
    if not data:
        return [], []
    try:
        doc = json.loads(data)
    except ValueError:
        return [], [f"{REVOCATIONS_KEY} is not JSON"]
    items = doc.get("revoked") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return [], [f'{REVOCATIONS_KEY} has no "revoked" list']
    out: list[Revoked] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        try:
            out.append(_entry(item))
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{REVOCATIONS_KEY} revoked[{i}]: {exc}")
    return out, problems


def _entry(item: Any) -> Revoked:
    if not isinstance(item, dict):
        raise ValueError("not an object")
    kind = item["kind"]
    if kind not in KINDS:
        raise ValueError("kind is not server or client")
    sha = str(item["sha256"]).lower()
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise ValueError("sha256 is not 64 hex digits")
    cluster = item["cluster"]
    if not isinstance(cluster, str) or not cluster:
        raise ValueError("cluster is not a name")
    serial = int(str(item["serial"]))
    if serial <= 0:
        raise ValueError("serial is not positive")
    return Revoked(
        cluster=cluster,
        kind=kind,
        serial=serial,
        sha256=sha,
        not_after=parse_rfc3339(item["notAfter"]),
        revoked_at=parse_rfc3339(item["revokedAt"]),
    )


def dump(entries: Iterable[Revoked]) -> bytes:
    """``revocations.json`` for ``entries`` (sorted: the same set gives the same bytes)."""
    docs = [e.doc() for e in sorted(set(entries))]
    return json.dumps({"revoked": docs}, indent=1, sort_keys=True).encode() + b"\n"


def merge(
    existing: Iterable[Revoked], new: Iterable[Revoked], *, now: dt.datetime
) -> tuple[list[Revoked], list[Revoked]]:
    """(the entries to store, the ones of ``new`` not revoked already): ``existing`` plus
    ``new`` by hash, the expired dropped."""
    kept = {e.sha256: e for e in existing if e.in_force(now)}
    added = []
    for e in new:
        if e.sha256 not in kept and e.in_force(now):
            kept[e.sha256] = e
            added.append(e)
    return sorted(kept.values()), added


def by_cluster(entries: Iterable[Revoked], *, now: dt.datetime) -> dict[str, list[Revoked]]:
    """The entries in force, by cluster."""
    out: dict[str, list[Revoked]] = {}
    for e in sorted(entries):
        if e.in_force(now):
            out.setdefault(e.cluster, []).append(e)
    return out


_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def sign_crl(entries: Sequence[Revoked], *, ca_cert_pem: bytes, ca_key_pem: bytes) -> bytes:
    """A PEM CRL of ``entries``' serials signed by the CA (raises ``ValueError`` when the
    CA does not parse). Deterministic (module docstring)."""
    ca = load_cert(ca_cert_pem)
    key = load_key(ca_key_pem)
    if ca is None or not isinstance(key, _SIGNING_KEYS):
        raise ValueError("the CA certificate or key does not parse")
    this_update = max((e.revoked_at for e in entries), default=ca.not_valid_before_utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(this_update)
        .next_update(max(ca.not_valid_after_utc, this_update + dt.timedelta(seconds=1)))
        .add_extension(x509.CRLNumber(len(entries)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
    )
    for e in sorted(entries, key=lambda e: e.serial):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(e.serial)
            .revocation_date(e.revoked_at)
            .build()
        )
    if isinstance(key, ec.EllipticCurvePrivateKey):
        crl = builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    elif isinstance(key, rsa.RSAPrivateKey):
        crl = builder.sign(key, hashes.SHA256())
    else:
        crl = builder.sign(key, None)
    return crl.public_bytes(serialization.Encoding.PEM)


def revocations(
    entries: Iterable[Revoked], *, ca_cert_pem: bytes, ca_key_pem: bytes, now: dt.datetime
) -> dict[str, Revocation]:
    """What the fleet serves: per cluster with entries in force, their hashes and the CRL
    of their serials signed by the current CA (``Revocation.crl`` empty when the CA cannot
    sign: the hashes still hold)."""
    out: dict[str, Revocation] = {}
    for cluster, mine in by_cluster(entries, now=now).items():
        try:
            crl = sign_crl(mine, ca_cert_pem=ca_cert_pem, ca_key_pem=ca_key_pem)
        except ValueError:
            crl = b""
        out[cluster] = Revocation(hashes=frozenset(e.sha256 for e in mine), crl=crl)
    return out


def changed_clusters(before: Mapping[str, Revocation], after: Mapping[str, Revocation]) -> set[str]:
    """The clusters whose revocation differs between two fleet versions."""
    return {c for c in set(before) | set(after) if before.get(c) != after.get(c)}
