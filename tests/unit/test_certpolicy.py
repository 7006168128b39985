"""atlasd.certpolicy: reading PEM, who issued a certificate, whose key it is, when it is due.

Renewal time over generated lifetimes and fractions (Hypothesis), the rest table-driven;
the last test keeps the policy in one place (no other module parses PEM or checks an
issuer itself)."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import atlasd
from atlasd.certpolicy import (
    is_due,
    issued_by,
    issued_by_any,
    key_belongs_to,
    load_cert,
    load_key,
    not_after,
    renew_at,
    renewal_at,
    renewal_time,
    same_key,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)


@functools.cache
def _key(i: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    *,
    subject: str = "leaf",
    key: ec.EllipticCurvePrivateKey | None = None,
    issuer: str = "ca",
    signer: ec.EllipticCurvePrivateKey | None = None,
    start: dt.datetime = T0,
    life: dt.timedelta = dt.timedelta(days=10),
    ski: bytes | None = None,
    aki: bytes | None = None,
) -> x509.Certificate:
    key = key or _key(0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + life)
    )
    if ski is not None:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
    if aki is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(aki, None, None), critical=False
        )
    return builder.sign(signer or _key(1), hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# Certificate times have one-second resolution.
starts = st.integers(0, 10 * 365 * 86400).map(lambda s: T0 + s * SECOND)
lifetimes = st.integers(1, 20 * 365 * 86400).map(lambda s: s * SECOND)
fractions = st.floats(min_value=0.01, max_value=1.0)


@settings(max_examples=200, deadline=None)
@given(start=starts, life=lifetimes, f=fractions, g=fractions)
def test_renewal_time_lies_in_the_lifetime_and_grows_with_the_fraction(
    start: dt.datetime, life: dt.timedelta, f: float, g: float
) -> None:
    cert = _cert(start=start, life=life)
    at = renewal_at(cert, f)
    assert start <= at <= start + life
    assert renewal_at(cert, 1.0) == start + life
    if f <= g:
        assert at <= renewal_at(cert, g)
    # The PEM readers say the same, as Unix time.
    assert renewal_time(_pem(cert), f) == at.timestamp()
    assert renew_at(_pem(cert), f) == at
    assert not_after(_pem(cert)) == (start + life).timestamp()


@settings(max_examples=200, deadline=None)
@given(
    life=lifetimes,
    f=st.floats(min_value=0.01, max_value=3.0),
    offset=st.integers(-86400, 86400).map(lambda s: s * SECOND),
    later=st.integers(0, 86400).map(lambda s: s * SECOND),
)
def test_due_from_the_renewal_time_or_the_expiry_on(
    life: dt.timedelta, f: float, offset: dt.timedelta, later: dt.timedelta
) -> None:
    cert = _cert(start=T0, life=life)
    end = T0 + life
    deadline = min(renewal_at(cert, f), end)
    now = deadline + offset
    assert is_due(cert, now, f) == (now >= deadline)
    # Once due, due for good; expired is due whatever the fraction (even above 1).
    if is_due(cert, now, f):
        assert is_due(cert, now + later, f)
    assert is_due(cert, end, f)


def test_due_takes_the_boundary_and_not_a_second_before() -> None:
    cert = _cert(start=T0, life=dt.timedelta(days=10))
    at = T0 + dt.timedelta(days=8)
    assert renewal_at(cert, 0.8) == at
    assert is_due(cert, at, 0.8)
    assert not is_due(cert, at - SECOND, 0.8)


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nbm90IGRlcg==\n-----END CERTIFICATE-----\n",
        b"-----BEGIN PRIVATE KEY-----\nbm90IGRlcg==\n-----END PRIVATE KEY-----\n",
    ],
)
def test_what_does_not_parse_is_none_and_issued_by_nobody(junk: bytes) -> None:
    assert load_cert(junk) is None
    assert load_key(junk) is None
    assert renewal_time(junk, 0.5) is None
    assert not_after(junk) is None
    assert not issued_by_any(junk, [_cert(subject="ca", issuer="ca")])


def test_load_cert_reads_the_first_of_a_bundle() -> None:
    first, second = _cert(subject="first"), _cert(subject="second")
    cert = load_cert(_pem(first) + _pem(second))
    assert cert is not None and cert.subject == first.subject


def test_load_key_reads_pkcs1_and_pkcs8_but_no_encrypted_key() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pkcs8 = _key(0).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    encrypted = _key(0).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert isinstance(load_key(pkcs1), rsa.RSAPrivateKey)
    assert isinstance(load_key(pkcs8), ec.EllipticCurvePrivateKey)
    assert load_key(encrypted) is None


def test_issued_by_checks_the_signature_and_the_issuer_name() -> None:
    ca_key, other_key = _key(1), _key(2)
    ca = _cert(subject="ca", key=ca_key, issuer="ca", signer=ca_key)
    impostor = _cert(subject="ca", key=other_key, issuer="ca", signer=other_key)
    renamed = _cert(subject="other-ca", key=ca_key, issuer="other-ca", signer=ca_key)
    leaf = _cert(issuer="ca", signer=ca_key)
    assert issued_by(leaf, ca)
    assert not issued_by(leaf, impostor)  # same name, another key
    assert not issued_by(leaf, renamed)  # same key, another name
    assert issued_by_any(_pem(leaf), [impostor, ca])
    assert not issued_by_any(_pem(leaf), [impostor, renamed])
    assert not issued_by_any(_pem(leaf), [])


def test_a_certificate_naming_another_key_than_the_cas_is_not_the_cas() -> None:
    """The authority key identifier is compared with the CA's stated subject key identifier
    (as OpenSSL and BoringSSL do): a mismatch is not the CA's, even with a good signature;
    a match, or either one absent, leaves it to the signature."""
    ca_key = _key(1)
    ca = _cert(subject="ca", key=ca_key, issuer="ca", signer=ca_key, ski=b"\x01" * 20)
    assert issued_by(_cert(signer=ca_key, aki=b"\x01" * 20), ca)
    assert not issued_by(_cert(signer=ca_key, aki=b"\x02" * 20), ca)
    assert issued_by(_cert(signer=ca_key), ca)  # no authority key identifier
    no_ski = _cert(subject="ca", key=ca_key, issuer="ca", signer=ca_key)
    assert issued_by(_cert(signer=ca_key, aki=b"\x02" * 20), no_ski)
    assert not issued_by(_cert(signer=_key(2), aki=b"\x01" * 20), ca)  # names it, not its


def test_each_certificate_is_judged_once_per_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    """``issued_by_any`` checks a (certificate, CA) pair once, then answers from its memo
    (the same verdict); what ``record_issued`` was told is never checked."""
    from atlasd import certpolicy
    from atlasd.memo import Memo

    checked: list[tuple[x509.Certificate, x509.Certificate]] = []

    def counting(cert: x509.Certificate, ca: x509.Certificate) -> bool:
        checked.append((cert, ca))
        return issued_by(cert, ca)

    monkeypatch.setattr(certpolicy, "issued_by", counting)
    monkeypatch.setattr(certpolicy, "_ISSUED", Memo(64))
    ca_key, other_key = _key(1), _key(2)
    ca = _cert(subject="ca", key=ca_key, issuer="ca", signer=ca_key)
    impostor = _cert(subject="ca", key=other_key, issuer="ca", signer=other_key)
    leaf, foreign = _pem(_cert(signer=ca_key)), _pem(_cert(signer=other_key, key=_key(3)))
    for _ in range(3):
        assert issued_by_any(leaf, [impostor, ca])
        assert not issued_by_any(foreign, [ca])
        assert issued_by_any(foreign, [ca, impostor])
    # (leaf, impostor), (leaf, ca), (foreign, ca), (foreign, impostor): each once.
    assert len(checked) == 4
    assert len({(_pem(c), _pem(a)) for c, a in checked}) == 4
    fresh = _pem(_cert(subject="fresh", signer=ca_key))
    certpolicy.record_issued(fresh, ca)
    assert issued_by_any(fresh, [ca])
    assert len(checked) == 4


def test_key_belongs_to_and_same_key() -> None:
    leaf = _cert(key=_key(0))
    assert key_belongs_to(_key(0), leaf)
    assert not key_belongs_to(_key(3), leaf)
    assert same_key(leaf, _cert(subject="other", key=_key(0)))
    assert not same_key(leaf, _cert(key=_key(3)))


def test_only_certpolicy_parses_pem_or_checks_an_issuer() -> None:
    calls = (
        "load_pem_x509_certificate",  # and load_pem_x509_certificates
        "load_pem_private_key",
        "verify_directly_issued_by",
    )
    root = Path(atlasd.__file__).parent
    offenders = [
        f"{path.relative_to(root)}: {call}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "certpolicy.py"
        for call in calls
        if call in path.read_text()
    ]
    assert offenders == []
