"""PKI policy: the certificate rules every reader of atlasd's PKI applies the same way.

Owns, for ``atlasd.fleet.trust`` (what the stored Secrets make trusted, what the status
reports) and ``atlasd.reconcile`` (whether a CA or a leaf is kept or replaced):

- reading PEM: ``load_cert`` (the first certificate), ``load_certs`` (a bundle) and ``load_key`` (an unencrypted
  private key, PKCS#1 or PKCS#8) answer None for anything that does not parse, so no
  caller sees an exception whose message could quote key material;
- who issued a certificate: ``issued_by`` (issuer name, key identifiers and signature
  checked directly against one CA) and ``issued_by_any`` (a PEM against a bundle, each
  (certificate, CA) pair judged once: ``record_issued`` tells it what a signer just made);
- whether a key is a certificate's: ``key_belongs_to``, ``same_key`` (compared as DER
  SubjectPublicKeyInfo);
- renewal time: a certificate is due once ``fraction`` of its lifetime (notBefore to
  notAfter) has passed, or once it has expired — ``renewal_at``/``is_due``, and the Unix
  times the status and metrics report (``renewal_time``, ``not_after``).

``cryptography`` and the standard library only; one memo (``_ISSUED``, the verdicts of
``issued_by_any``), the callers keeping what they have parsed (``atlasd.fleet.trust.StoredCA``,
``atlasd.reconcile.certs.CA``).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from atlasd.memo import Memo

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


def _key_ids_differ(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``cert``'s authority key identifier names another key than the one ``ca``'s
    subject key identifier states (both present). OpenSSL and BoringSSL (Envoy's) then do not
    take ``ca`` for the issuer (``X509_V_ERR_AKID_SKID_MISMATCH``), whatever the signature."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return False
    return aki.key_identifier is not None and aki.key_identifier != ski.digest


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` issued ``cert``: ``cert`` names ``ca`` as its issuer, its authority key
    identifier (if both state one) is ``ca``'s subject key identifier, and ``ca``'s key
    verifies its signature (no chain, no validity period: callers check those). The key
    identifiers spare the signature check of a leaf against a rotation's successor CA (same
    name, another key)."""
    if _key_ids_differ(cert, ca):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# The verdicts of ``issued_by_any`` by (SHA-256 of the certificate's PEM, the CA): every
# replica's fleet judges each stored leaf against the trust bundle, the reconcile judges it
# again before keeping it, and a CA rotation judges every leaf against the new bundle while
# the leaves are re-issued — the same pairs, each verified once now (a CA rotation at 500
# clusters: 4,038 checks -> 1,009, bench/README.md). A digest, so no certificate is kept
# alive by it.
_ISSUED: Memo[tuple[bytes, x509.Certificate], bool] = Memo(65_536)


def record_issued(cert_pem: bytes, ca: x509.Certificate) -> None:
    """What a signer just made: ``ca`` issued ``cert_pem`` (``issued_by_any`` need not check)."""
    _ISSUED.get((hashlib.sha256(cert_pem).digest(), ca), lambda: True)


def issued_by_any(cert_pem: bytes, trusted: Iterable[x509.Certificate]) -> bool:
    """Whether the first certificate of ``cert_pem`` parses and one of ``trusted`` issued it."""
    digest = hashlib.sha256(cert_pem).digest()
    parsed: list[x509.Certificate | None] = []  # parsed once, on the first miss

    def judge(ca: x509.Certificate) -> bool:
        if not parsed:
            parsed.append(load_cert(cert_pem))
        cert = parsed[0]
        return cert is not None and issued_by(cert, ca)

    return any(_ISSUED.get((digest, ca), functools.partial(judge, ca)) for ca in trusted)


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
