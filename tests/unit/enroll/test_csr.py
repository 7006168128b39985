"""What an agent may ask for: the agent's own request is signed as atlasd would issue the
leaf; anything else is refused with the rule it broke."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from atlasd.enroll import agent, csr
from atlasd.enroll.token import Refused
from atlasd.model import Settings
from tests.unit.xds import helpers

S = Settings()
CA = helpers.make_ca()
NOW = dt.datetime.now(dt.UTC)


def make_csr(
    cn: str = "east",
    dns: tuple[str, ...] = ("east", "east.monitoring.atlas"),
    *,
    key: object = None,
    ips: tuple[str, ...] = (),
) -> str:
    import ipaddress

    key = key or ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


def test_the_agents_request_is_signed_like_atlasds_own_leaves() -> None:
    keys, requests = agent.new_request("east", S)
    checked = csr.check_request(requests, "east", S)
    certs = csr.issue(checked, "east", ca=CA, settings=S, now=NOW, lifetime=dt.timedelta(hours=1))
    for kind, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert = x509.load_pem_x509_certificate(certs[kind])
        assert cert.issuer == CA.cert.subject
        cert.verify_directly_issued_by(CA.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["east", "east.monitoring.atlas"]
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        assert cert.public_key() == keys[kind].public_key()
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        # Back-dated by at most a tenth of its life (renewal at 2/3 is not due at once).
        assert dt.timedelta(hours=1) < life <= dt.timedelta(hours=1, minutes=6)


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"dns": ("west", "west.monitoring.atlas")}, "DNS names must be exactly"),
        ({"dns": ("east",)}, "DNS names must be exactly"),
        ({"dns": ("east", "east.monitoring.atlas", "atlas")}, "DNS names must be exactly"),
        ({"dns": ("east", "east", "east.monitoring.atlas")}, "DNS names must be exactly"),
        ({"ips": ("203.0.113.1",)}, "DNS names must be exactly"),
        ({"dns": ()}, "names no DNS names"),
        ({"cn": "atlas"}, "common name must be 'east'"),
        ({"key": ec.generate_private_key(ec.SECP384R1())}, "ECDSA P-256"),
        ({"key": rsa.generate_private_key(public_exponent=65537, key_size=2048)}, "ECDSA P-256"),
    ],
)
def test_a_request_that_is_not_the_clusters_leaf_is_refused(
    kwargs: dict[str, object], said: str
) -> None:
    spec = csr.specs("east", S)["server"]
    with pytest.raises(Refused, match=said) as info:
        csr.check_csr(make_csr(**kwargs), spec, kind="server")  # type: ignore[arg-type]
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("pem", "said"),
    [
        (None, "not a PEM string"),
        ("garbage", "not a PEM certificate signing request"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
        ("x" * (csr.MAX_CSR_BYTES + 1), "larger than"),
    ],
)
def test_garbage_and_oversized_requests_are_refused(pem: object, said: str) -> None:
    with pytest.raises(Refused, match=said):
        csr.check_csr(pem, csr.specs("east", S)["server"], kind="server")


def test_a_tampered_request_fails_its_signature() -> None:
    good = x509.load_pem_x509_csr(make_csr().encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(Refused, match=r"signature|does not parse"):
        csr.check_csr(tampered, csr.specs("east", S)["server"], kind="server")


def test_a_request_must_hold_both_leaves_with_distinct_keys() -> None:
    spec_dns = ("east", "east.monitoring.atlas")
    with pytest.raises(Refused, match="exactly server and client"):
        csr.check_request({"server": make_csr()}, "east", S)
    with pytest.raises(Refused, match="exactly server and client"):
        csr.check_request("nope", "east", S)
    key = ec.generate_private_key(ec.SECP256R1())
    shared = {"server": make_csr(dns=spec_dns, key=key), "client": make_csr(dns=spec_dns, key=key)}
    with pytest.raises(Refused, match="must not share a key"):
        csr.check_request(shared, "east", S)
