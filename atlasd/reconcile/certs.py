"""X.509 primitives of atlasd's PKI: CAs, leaves, and whether a leaf is still good.

Pure functions over ``cryptography`` objects; the only randomness (private keys, serial
numbers) comes from a ``KeySource``, and ECDSA signatures are deterministic (RFC 6979), so
the same inputs give the same bytes. ``atlasd.reconcile.pki`` decides *which* certificates
should exist; this module makes and checks them.

- CAs made here: ECDSA P-256, self-signed, pathlen 0, back-dated by ``CLOCK_SKEW``; a CA
  that replaces another takes its name, and ``cross_sign`` makes the link (the new CA's
  name and key, signed by the old CA) that lets peers trusting only the old CA verify
  what the new one signs.
- Leaves: ECDSA P-256, random serial from the ``KeySource``, SHA-256, SANs and extended key
  usage from a ``LeafSpec``, validity capped at the signing CA's, AKI/SKI set.
- A leaf is current when it parses, its key is P-256 and matches it, the current CA signed
  it, its SANs and usages are those of its spec, and less than ``renew_fraction`` of its
  lifetime has passed (how PEM is read, an issuer or a key checked and the renewal time
  computed is ``atlasd.certpolicy``'s; this module applies it to a ``LeafSpec``). Nothing
  is memoized here: callers check a leaf once per change of its Secret
  (``atlasd.reconcile.applier`` remembers which keys are in sync).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from atlasd.addresses import parse_ip
from atlasd.certpolicy import (
    is_due_within,
    issued_by_any,
    key_belongs_to,
    load_cert,
    load_key,
    record_issued,
)
from atlasd.fleet.trust import CAChain, Serials
from atlasd.memo import Memo
from atlasd.model import PKI, CertKey

CLOCK_SKEW = dt.timedelta(minutes=5)
"""Leaves and CAs are back-dated by this much so a peer with a slow clock accepts them."""

Usage = Literal["server", "client", "both"]


class KeySource(Protocol):
    """Where new private keys and serial numbers come from (injectable for tests)."""

    def new_key(self) -> ec.EllipticCurvePrivateKey: ...

    def new_serial(self) -> int: ...


class RandomKeys:
    """The production ``KeySource``: fresh P-256 keys and 159-bit random serials."""

    def new_key(self) -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def new_serial(self) -> int:
        return x509.random_serial_number()


@dataclass(frozen=True)
class CA(CAChain):
    """The current signing CA and the earlier CAs still in the trust bundle."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    material: CertKey
    revision: int
    previous: Serials = ()
    links: Serials = ()

    @functools.cached_property
    def pki(self) -> PKI:
        """The trust material the Envoys get (``model.PKI``)."""
        return PKI(
            ca=self.material,
            trust_bundle=self.bundle,
            ca_serial=self.serial,
            ca_revision=self.revision,
            chain=self.chain,
        )


@dataclass(frozen=True)
class LeafSpec:
    """What one leaf certificate must say."""

    common_name: str
    dns: tuple[str, ...]
    ips: tuple[str, ...] = ()
    usage: Usage = "server"


def as_utc(now: dt.datetime) -> dt.datetime:
    return now if now.tzinfo else now.replace(tzinfo=dt.UTC)


def key_pem(key: CertificateIssuerPrivateKeyTypes | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def sign(
    builder: x509.CertificateBuilder, key: CertificateIssuerPrivateKeyTypes
) -> x509.Certificate:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    if isinstance(key, rsa.RSAPrivateKey):
        return builder.sign(key, hashes.SHA256())
    return builder.sign(key, None)  # ed25519/ed448 take no hash


def _eku(usage: Usage) -> list[x509.ObjectIdentifier]:
    if usage == "server":
        return [ExtendedKeyUsageOID.SERVER_AUTH]
    if usage == "client":
        return [ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _sans(spec: LeafSpec) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = [x509.DNSName(d) for d in spec.dns]
    out += [x509.IPAddress(parse_ip(i)) for i in spec.ips]
    return out


# --- CA ---


CA_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "atlasd"),
        x509.NameAttribute(NameOID.COMMON_NAME, "atlas-ca"),
    ]
)

# A CA certificate's key usage (the test harness's CAs use it too).
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def new_ca(
    *,
    keys: KeySource,
    now: dt.datetime,
    lifetime: dt.timedelta,
    name: x509.Name = CA_NAME,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 CA (pathlen 0) named ``name`` (a rotation passes the old
    CA's name, see ``cross_sign``)."""
    now = as_utc(now)
    key = keys.new_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(keys.new_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
    )
    return sign(builder, key), key


def _key_id(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    """A certificate's subject key identifier as it states it (else computed, RFC 5280)."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def cross_sign(
    successor: x509.Certificate,
    *,
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    keys: KeySource,
    now: dt.datetime,
) -> x509.Certificate:
    """The link from ``issuer`` to ``successor``: ``successor``'s name, key and key
    identifier, signed by ``issuer`` (its authority key identifier names ``issuer``'s key),
    valid until the earlier of the two expiries.

    A peer that trusts only ``issuer`` verifies leaf -> link -> ``issuer``. A rotation
    gives ``successor`` the name of ``issuer``, so the link is self-issued and does not
    count against ``issuer``'s path length 0 (RFC 5280, 6.1.4 (l)); the differing key
    identifiers keep it from being taken for a self-signed root.
    """
    now = as_utc(now)
    builder = (
        x509.CertificateBuilder()
        .subject_name(successor.subject)
        .issuer_name(issuer.subject)
        .public_key(successor.public_key())
        .serial_number(keys.new_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(successor.not_valid_after_utc, issuer.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(_key_id(successor), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_key_id(issuer)),
            critical=False,
        )
    )
    return sign(builder, issuer_key)


def issue_leaf(
    spec: LeafSpec, *, ca: CA, keys: KeySource, now: dt.datetime, lifetime: dt.timedelta
) -> CertKey:
    """A new ECDSA P-256 leaf signed by ``ca``."""
    key = keys.new_key()
    cert = sign_leaf(
        spec,
        key.public_key(),
        ca=ca,
        serial=keys.new_serial(),
        now=now,
        lifetime=lifetime,
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    record_issued(pem, ca.cert)
    return CertKey(pem, key_pem(key))


def sign_leaf(
    spec: LeafSpec,
    public_key: ec.EllipticCurvePublicKey,
    *,
    ca: CA,
    serial: int,
    now: dt.datetime,
    lifetime: dt.timedelta,
    skew: dt.timedelta = CLOCK_SKEW,
) -> x509.Certificate:
    """The leaf certificate of ``spec`` for ``public_key`` (a key atlasd made, or one an
    enrolling agent holds: ``atlasd.enroll``), signed by ``ca``, back-dated by ``skew``;
    validity capped at the CA's."""
    now = as_utc(now)
    not_after = min(now + lifetime, ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "atlasd"),
                    x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - skew)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(_eku(spec.usage)), critical=False)
        .add_extension(x509.SubjectAlternativeName(_sans(spec)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            # The CA's key identifier as it states it (OpenSSL and BoringSSL compare the
            # two; a CA made elsewhere may compute its own another way: RFC 7093).
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_key_id(ca.cert)),
            critical=False,
        )
    )
    return sign(builder, ca.key)


def _p256_key_of(cert: x509.Certificate, key_pem: bytes) -> bool:
    """Whether ``key_pem`` is an ECDSA P-256 key and ``cert``'s (a leaf's key rule)."""
    key = load_key(key_pem)
    return (
        isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
        and key_belongs_to(key, cert)
    )


def leaf_is_current(
    material: CertKey | None, spec: LeafSpec, *, ca: CA, now: dt.datetime, renew_fraction: float
) -> bool:
    """Whether an existing leaf can be kept (see module docstring for the rules)."""
    if material is None:
        return False
    validity = _kept_validity(material, spec, ca.cert)
    if validity is None:
        return False
    return not is_due_within(*validity, as_utc(now), renew_fraction)


# What ``_kept_validity`` found, by (SHA-256 of the leaf's certificate and key, the CA, the
# spec): a reconcile of a cluster whose leaves did not change (every cluster, after a
# fleet-wide change such as an Alertmanager appearing) does not parse and verify them
# again (0.17 ms -> 0.005 ms of CPU per leaf, two per cluster; bench/README.md).
# A digest, not the PEMs, so no old material is kept alive.
_KEPT: Memo[tuple[bytes, x509.Certificate, LeafSpec], tuple[dt.datetime, dt.datetime] | None] = (
    Memo(65_536)
)


def _kept_validity(
    material: CertKey, spec: LeafSpec, ca: x509.Certificate
) -> tuple[dt.datetime, dt.datetime] | None:
    """(notBefore, notAfter) of a leaf that passes every rule that does not depend on the
    time (issued by ``ca``, a P-256 key that is its own, ``spec``'s names and usage);
    None if one fails. Memoized (``_KEPT``)."""
    digest = hashlib.sha256(material.cert_pem + b"\0" + material.key_pem).digest()
    return _KEPT.get((digest, ca, spec), lambda: _validity_if_keepable(material, spec, ca))


def _validity_if_keepable(
    material: CertKey, spec: LeafSpec, ca: x509.Certificate
) -> tuple[dt.datetime, dt.datetime] | None:
    if not issued_by_any(material.cert_pem, (ca,)):
        return None
    cert = load_cert(material.cert_pem)
    if cert is None:
        return None
    if not _p256_key_of(cert, material.key_pem):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    if dns != set(spec.dns) or ips != set(spec.ips) or set(eku) != set(_eku(spec.usage)):
        return None
    return cert.not_valid_before_utc, cert.not_valid_after_utc
