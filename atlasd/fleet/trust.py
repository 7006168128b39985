"""Reading the stored PKI: the ``atlas-ca`` Secret and whether a stored leaf is trusted.

The one loader of ``atlas-ca`` (``ca.pem``, ``ca-key.pem``, earlier CAs as
``ca-<serial>.pem``; label ``goatlas.io/ca-revision``): the fleet reads it to know what every
replica trusts, and ``atlasd.reconcile.pki`` starts from the same parse when it decides
whether to keep, adopt or rotate the CA. Pure; nothing here issues or writes anything.

Earlier CAs stay trusted until they expire; the bundle is the current CA first, then the
earlier ones newest first (by notBefore, then serial).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from atlasd import labels
from atlasd.kube.apply import decoded_secret_data
from atlasd.model import CertKey

CA_CERT_KEY = "ca.pem"
CA_KEY_KEY = "ca-key.pem"


def previous_key(serial: str) -> str:
    """The data key of an earlier CA kept in ``atlas-ca``."""
    return f"ca-{serial}.pem"


@dataclass(frozen=True)
class StoredCA:
    """``atlas-ca`` as stored: the current CA and the earlier ones still trusted."""

    cert: x509.Certificate
    material: CertKey
    revision: int
    # (serial, PEM) of earlier CAs still trusted, newest first.
    previous: tuple[tuple[str, bytes], ...]
    # Every CA certificate a leaf may be signed by (current first).
    trusted: tuple[x509.Certificate, ...]

    @functools.cached_property
    def serial(self) -> str:
        return str(self.cert.serial_number)

    @functools.cached_property
    def bundle(self) -> bytes:
        return self.material.cert_pem + b"".join(pem for _, pem in self.previous)


def revision_of(secret: Mapping[str, Any] | None) -> int:
    """``goatlas.io/ca-revision`` as a positive integer (1 when absent or malformed)."""
    meta = (secret or {}).get("metadata") or {}
    raw = (meta.get("labels") or {}).get(labels.CA_REVISION_LABEL, "1")
    text = str(raw)
    return max(int(text), 1) if text.isdigit() else 1


def previous_cas(
    data: Mapping[str, bytes], current_serial: str, now: dt.datetime
) -> list[tuple[str, bytes, x509.Certificate]]:
    """Earlier CAs in ``data`` that are still valid at ``now`` and named by their serial."""
    out: list[tuple[str, bytes, x509.Certificate]] = []
    for k, pem in data.items():
        if not (k.startswith("ca-") and k.endswith(".pem")) or k == CA_KEY_KEY:
            continue
        serial = k[3:-4]
        if serial == current_serial:
            continue
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            continue
        if cert.not_valid_after_utc <= now or str(cert.serial_number) != serial:
            continue
        out.append((serial, pem, cert))
    return out


def order_previous(
    items: list[tuple[str, bytes, x509.Certificate]],
) -> list[tuple[str, bytes, x509.Certificate]]:
    """Newest first (notBefore, then serial)."""
    return sorted(items, key=lambda t: (t[2].not_valid_before_utc, t[0]), reverse=True)


def read_ca(secret: Mapping[str, Any] | None, *, now: dt.datetime) -> StoredCA | None:
    """The stored CA, or None when ``atlas-ca`` is absent or its certificate unusable.

    Whether ``ca-key.pem`` belongs to the certificate is checked where the key is used to
    sign (``atlasd.reconcile.pki.load_ca``); reading what is trusted needs only certificates.
    """
    data = decoded_secret_data(secret or {})
    if CA_CERT_KEY not in data or CA_KEY_KEY not in data:
        return None
    try:
        cert = x509.load_pem_x509_certificate(data[CA_CERT_KEY])
    except ValueError:
        return None
    serial = str(cert.serial_number)
    previous = order_previous(previous_cas(data, serial, now))
    return StoredCA(
        cert=cert,
        material=CertKey(data[CA_CERT_KEY], data[CA_KEY_KEY]),
        revision=revision_of(secret),
        previous=tuple((s, pem) for s, pem, _ in previous),
        trusted=(cert, *(c for _, _, c in previous)),
    )


def trusted_pair(
    data: Mapping[str, bytes],
    cert_key: str,
    key_key: str,
    trusted: tuple[x509.Certificate, ...],
) -> CertKey | None:
    """The (certificate, key) stored under ``cert_key``/``key_key`` if a trusted CA signed
    the certificate; None otherwise."""
    if cert_key not in data or key_key not in data:
        return None
    if not signed_by_any(data[cert_key], trusted):
        return None
    return CertKey(data[cert_key], data[key_key])


def signed_by_any(cert_pem: bytes, trusted: tuple[x509.Certificate, ...]) -> bool:
    """Whether the first certificate of ``cert_pem`` was issued by one of ``trusted``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    for ca in trusted:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def not_after(cert_pem: bytes) -> float | None:
    """notAfter of a PEM certificate as Unix time (None if it does not parse)."""
    try:
        return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
    except ValueError:
        return None


def renewal_time(cert_pem: bytes, fraction: float) -> float | None:
    """When a certificate reaches ``fraction`` of its lifetime (Unix time)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return (start + (end - start) * fraction).timestamp()
