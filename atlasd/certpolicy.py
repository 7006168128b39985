"""PKI policy: the certificate rules every reader of atlasd's PKI applies the same way.

Owns, for ``atlasd.fleet.trust`` (what the stored Secrets make trusted, what the status
reports) and ``atlasd.reconcile`` (whether a CA or a leaf is kept or replaced):

- reading PEM: ``load_cert`` (the first certificate), ``load_certs`` (a bundle) and ``load_key`` (an unencrypted
  private key, PKCS#1 or PKCS#8) answer None for anything that does not parse, so no
  caller sees an exception whose message could quote key material;
- who issued a certificate: ``issued_by`` (signature and issuer name checked directly
  against one CA) and ``issued_by_any``;
- whether a key is a certificate's: ``key_belongs_to``, ``same_key`` (compared as DER
  SubjectPublicKeyInfo);
- renewal time: a certificate is due once ``fraction`` of its lifetime (notBefore to
  notAfter) has passed, or once it has expired — ``renewal_at``/``is_due``, and the Unix
  times the status and metrics report (``renewal_time``, ``not_after``).

Pure: ``cryptography`` and the standard library only, nothing memoized (the callers keep
what they have parsed: ``atlasd.fleet.trust.StoredCA``, ``atlasd.reconcile.certs.CA``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

# --- reading PEM ---


def load_cert(pem: bytes) -> x509.Certificate | None:
    """The first certificate of ``pem``; None when there is none or it does not parse."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None


def load_certs(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of ``pem`` (a bundle); empty when none parses."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def load_key(pem: bytes) -> PrivateKeyTypes | None:
    """The unencrypted private key of ``pem`` (PKCS#1 or PKCS#8); None when it does not
    parse or needs a password. The parse error is dropped: its message may quote the key."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return None


# --- issuer and key ---


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` issued ``cert``: ``cert`` names ``ca`` as its issuer and ``ca``'s key
    verifies its signature (no chain, no validity period: callers check those)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issued_by_any(cert_pem: bytes, trusted: Iterable[x509.Certificate]) -> bool:
    """Whether the first certificate of ``cert_pem`` parses and one of ``trusted`` issued it."""
    cert = load_cert(cert_pem)
    return cert is not None and any(issued_by(cert, ca) for ca in trusted)


def public_der(key: PublicKeyTypes) -> bytes:
    """A public key as DER SubjectPublicKeyInfo (the form two keys are compared in)."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def same_key(a: x509.Certificate, b: x509.Certificate) -> bool:
    """Whether two certificates carry the same public key (a CA and its cross-signed link)."""
    return public_der(a.public_key()) == public_der(b.public_key())


def key_belongs_to(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    return public_der(key.public_key()) == public_der(cert.public_key())


# --- renewal time ---


def renewal_offset(lifetime: dt.timedelta, fraction: float) -> dt.timedelta:
    """How long after its notBefore a certificate valid for ``lifetime`` is due."""
    return lifetime * fraction


def renewal_at(cert: x509.Certificate, fraction: float) -> dt.datetime:
    """When ``cert`` reaches ``fraction`` of its lifetime (1.0: its notAfter)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + renewal_offset(end - start, fraction)


def is_due(cert: x509.Certificate, now: dt.datetime, fraction: float) -> bool:
    """Whether ``cert`` must be replaced at ``now`` (an aware datetime): ``fraction`` of its
    lifetime has passed, or it has expired (which a ``fraction`` above 1 would not say)."""
    return is_due_within(cert.not_valid_before_utc, cert.not_valid_after_utc, now, fraction)


def is_due_within(start: dt.datetime, end: dt.datetime, now: dt.datetime, fraction: float) -> bool:
    """``is_due`` of a certificate valid from ``start`` to ``end``."""
    return now >= start + renewal_offset(end - start, fraction) or now >= end


def renew_at(cert_pem: bytes, fraction: float) -> dt.datetime:
    """``renewal_at`` of a PEM certificate that atlasd checked or issued itself (raises
    ``ValueError`` if it does not parse)."""
    return renewal_at(x509.load_pem_x509_certificate(cert_pem), fraction)


def renewal_time(cert_pem: bytes, fraction: float) -> float | None:
    """``renewal_at`` of a PEM certificate as Unix time (None if it does not parse)."""
    cert = load_cert(cert_pem)
    return None if cert is None else renewal_at(cert, fraction).timestamp()


def not_after(cert_pem: bytes) -> float | None:
    """notAfter of a PEM certificate as Unix time (None if it does not parse)."""
    cert = load_cert(cert_pem)
    return None if cert is None else cert.not_valid_after_utc.timestamp()
