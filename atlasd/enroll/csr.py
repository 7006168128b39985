"""What an enrolling agent may ask for, and the certificates atlasd gives it.

An agent sends one certificate signing request per leaf of its cluster (``server`` and
``client``, ``atlasd.reconcile.pki.cluster_specs``). A request is signed only if it is
exactly what atlasd would issue itself: PEM, at most ``MAX_CSR_BYTES``, a valid
self-signature, an ECDSA P-256 key, the subject common name and the DNS names of the
cluster's leaf and nothing else (no IP, URI or e-mail names, no other cluster's name).
The extensions of the certificate are atlasd's (``certs.sign_leaf``: the spec's usages),
never copied from the request. The two requests must not share a key.

Pure: ``cryptography``; refusals (``token.Refused``, 400) name the rule broken, never the
request's content.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from atlasd.certpolicy import public_der
from atlasd.enroll.token import Refused
from atlasd.model import Settings
from atlasd.reconcile.certs import CA, CLOCK_SKEW, LeafSpec, sign_leaf
from atlasd.reconcile.pki import cluster_specs

MAX_CSR_BYTES = 8192
KINDS = ("server", "client")
# What cryptography raises for a request it cannot read (not all are ValueErrors; found by
# tests/property/test_enroll.py flipping bytes of a valid request).
_UNREADABLE = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.UnsupportedGeneralNameType,
    x509.DuplicateExtension,
)


def specs(cluster: str, settings: Settings) -> dict[str, LeafSpec]:
    server, client = cluster_specs(cluster, settings)
    return {"server": server, "client": client}


def check_csr(pem: object, spec: LeafSpec, *, kind: str) -> ec.EllipticCurvePublicKey:
    """The public key of a request for ``spec``; ``Refused`` (400) otherwise."""
    if not isinstance(pem, str):
        raise Refused(400, f"{kind}: the request is not a PEM string")
    if len(pem) > MAX_CSR_BYTES:
        raise Refused(400, f"{kind}: the request is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (*_UNREADABLE, UnicodeEncodeError) as exc:
        raise Refused(400, f"{kind}: not a PEM certificate signing request") from exc
    try:
        signed = csr.is_signature_valid
        key = csr.public_key()
    except _UNREADABLE as exc:
        raise Refused(400, f"{kind}: the request does not parse") from exc
    if not signed:
        raise Refused(400, f"{kind}: the request's signature is not valid")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise Refused(400, f"{kind}: the key must be ECDSA P-256")
    try:
        cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = ext.get_values_for_type(x509.DNSName)
        others = len(list(ext)) - len(dns)
    except x509.ExtensionNotFound as exc:
        raise Refused(400, f"{kind}: the request names no DNS names") from exc
    except _UNREADABLE as exc:
        raise Refused(400, f"{kind}: the request's extensions do not parse") from exc
    if cns != [spec.common_name]:
        raise Refused(400, f"{kind}: the subject common name must be {spec.common_name!r}")
    if others or sorted(dns) != sorted(spec.dns) or len(set(dns)) != len(dns):
        raise Refused(400, f"{kind}: the DNS names must be exactly {', '.join(spec.dns)}")
    return key


def check_request(
    csrs: object, cluster: str, settings: Settings
) -> dict[str, ec.EllipticCurvePublicKey]:
    """The public keys of a ``{"server": pem, "client": pem}`` request for ``cluster``."""
    if not isinstance(csrs, Mapping) or sorted(csrs) != sorted(KINDS):
        raise Refused(400, "csrs must be an object with exactly server and client")
    wanted = specs(cluster, settings)
    keys = {kind: check_csr(csrs[kind], wanted[kind], kind=kind) for kind in KINDS}
    if public_der(keys["server"]) == public_der(keys["client"]):
        raise Refused(400, "the server and client requests must not share a key")
    return keys


def issue(
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    cluster: str,
    *,
    ca: CA,
    settings: Settings,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> dict[str, bytes]:
    """The PEM certificates of ``keys`` (checked by ``check_request``)."""
    wanted = specs(cluster, settings)
    # Back-dated by at most a tenth of their life: a short-lived certificate (minutes) must
    # not reach its renewal time (2/3) the moment it is issued.
    skew = min(CLOCK_SKEW, lifetime / 10)
    return {
        kind: sign_leaf(
            wanted[kind],
            key,
            ca=ca,
            serial=x509.random_serial_number(),
            now=now,
            lifetime=lifetime,
            skew=skew,
        ).public_bytes(serialization.Encoding.PEM)
        for kind, key in keys.items()
    }
