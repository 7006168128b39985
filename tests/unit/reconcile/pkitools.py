"""Deterministic key sources and a CA made the way the original made one (tests only).

``original_ca`` differs from ``atlasd.reconcile.certs.new_ca`` on purpose: it builds the
ORIGINAL Atlas's ``atlas-ca`` (RSA 4096, PKCS#1, serial 1), which atlasd must adopt."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from atlasd import labels
from atlasd.reconcile.certs import CA_KEY_USAGE
from atlasd.reconcile.objects import SecretObject, secret_object
from atlasd.reconcile.pki import PKIPlan


@functools.cache
def _pool(n: int) -> tuple[ec.EllipticCurvePrivateKey, ...]:
    return tuple(ec.generate_private_key(ec.SECP256R1()) for _ in range(n))


class CountingKeys:
    """Keys from a fixed pool (cycled, entered at ``start`` mod the pool size) and serials
    ``start``, ``start + 1``, ...: reproducible plans; different starts give different keys."""

    def __init__(self, start: int = 1000, pool: int = 64) -> None:
        self._keys = itertools.islice(itertools.cycle(_pool(pool)), start % pool, None)
        self._serials = itertools.count(start)
        self.issued = 0

    def new_key(self) -> ec.EllipticCurvePrivateKey:
        self.issued += 1
        return next(self._keys)

    def new_serial(self) -> int:
        return next(self._serials)


def plan_secrets(plan: PKIPlan) -> dict[str, SecretObject]:
    """The Secrets a plan writes, by name (what the next pass observes)."""
    out: dict[str, SecretObject] = {plan.ca_secret["metadata"]["name"]: plan.ca_secret}
    for s in (*plan.tls_secrets, *plan.identity_secrets.values()):
        out[s["metadata"]["name"]] = s
    return out


@functools.cache
def _rsa4096() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=4096)


def original_ca(
    now: dt.datetime,
    *,
    days: int = 3650,
    namespace: str = "monitoring",
    ski: bytes | None = None,
) -> tuple[SecretObject, bytes, bytes]:
    """``atlas-ca`` as the original wrote it: RSA 4096, PKCS#1 ``RSA PRIVATE KEY``; with
    ``ski``, stating that subject key identifier (a CA made by other tools).

    Returns (Secret, cert PEM, key PEM).
    """
    key = _rsa4096()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atlas")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
    )
    if ski is not None:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    secret = secret_object(
        name=labels.CA_SECRET,
        namespace=namespace,
        data={"ca.pem": cert_pem, "ca-key.pem": key_pem},
        obj_labels={labels.CA_LABEL: "true", labels.CA_SERIAL_LABEL: "1"},
        annotations={"objectset.rio.cattle.io/id": "atlas-ca"},
    )
    return secret, cert_pem, key_pem


def with_annotation(obj: SecretObject, key: str, value: str) -> dict[str, Any]:
    out: dict[str, Any] = {**obj, "metadata": {**obj["metadata"]}}
    out["metadata"]["annotations"] = {**obj["metadata"].get("annotations", {}), key: value}
    return out


def openssl_verdict(chain_pem: bytes, key_pem: bytes, trust_pem: bytes) -> str | None:
    """Whether OpenSSL, trusting only ``trust_pem``, accepts a server presenting
    ``chain_pem`` (leaf first): None if it does, else its reason. A TLS handshake in
    memory, so the chain is built and checked exactly as a TLS peer would."""
    import ssl
    import tempfile
    from pathlib import Path

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert.write_bytes(chain_pem)
        key.write_bytes(key_pem)
        server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=trust_pem.decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return str(exc.verify_message)
            except ssl.SSLError as exc:
                return str(exc.reason)
            peer_in.write(out.read())
        if done == 2:
            return None
    return "handshake did not finish"
