"""Reading the stored PKI: the ``atlas-ca`` Secret and whether a stored leaf is trusted.

The one loader of ``atlas-ca`` (``ca.pem``, ``ca-key.pem``, earlier CAs as
``ca-<serial>.pem``, cross-signed links as ``ca-cross-<serial>.pem``; label
``goatlas.io/ca-revision``): the fleet reads it to know what every replica trusts, and
``atlasd.reconcile.pki`` starts from the same parse when it decides whether to keep, adopt
or rotate the CA (``read_ca``, then ``signing_ca`` adds the checked key). Pure; nothing
here issues or writes anything.

Earlier CAs stay trusted until they expire, an operator deletes their key from the
Secret, or ``EARLIER_KEPT`` newer earlier CAs are kept (each rotation adds one: the
bundle, the links every leaf is sent with and every trust check would otherwise grow
with every rotation for the CA's ten years); the bundle is the current CA first, then the
earlier ones newest first (by notBefore, then serial).

A link ``ca-cross-<serial>.pem`` is the certificate of the CA that followed CA ``<serial>``
(its name and key), signed by CA ``<serial>`` at the rotation. A link is used only while CA
``<serial>`` is trusted, its signature and key check out and it has not expired; the chain
(``chain_of``) follows the links from the current CA back through the earlier ones and
stops at the first missing one (rotations made before links existed have none).

What a certificate is (PEM parsing, who issued it, when it is due) is ``atlasd.certpolicy``'s;
this module applies it to the layout of ``atlas-ca``.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from atlasd import labels
from atlasd.certpolicy import issued_by, issued_by_any, load_cert, same_key
from atlasd.certpolicy import not_after as not_after  # re-exported (atlasd.fleet.state)
from atlasd.certpolicy import renewal_time as renewal_time  # re-exported (atlasd.fleet.state)
from atlasd.kube import bodies
from atlasd.kube.secrets import secret_data
from atlasd.model import CertKey

CA_CERT_KEY = "ca.pem"
CA_KEY_KEY = "ca-key.pem"


LINK_PREFIX = "ca-cross-"

# Earlier CAs trusted at most (the newest): values rendered before this many rotations
# keep working without an operator step (docs/operations.md, CA rotation).
EARLIER_KEPT = 4


def previous_key(serial: str) -> str:
    """The data key of an earlier CA kept in ``atlas-ca``."""
    return f"ca-{serial}.pem"


def link_key(serial: str) -> str:
    """The data key of the link from CA ``serial`` to the CA that followed it."""
    return f"{LINK_PREFIX}{serial}.pem"


Serials = tuple[tuple[str, bytes], ...]


def chain_of(previous: Serials, links: Serials) -> bytes:
    """The links from the current CA back through ``previous`` (newest first), as PEM,
    up to the first earlier CA that has none."""
    by_serial = dict(links)
    out: list[bytes] = []
    for serial, _ in previous:
        link = by_serial.get(serial)
        if link is None:
            break
        out.append(link)
    return b"".join(out)


def read_links(
    data: Mapping[str, bytes],
    current: x509.Certificate,
    previous: list[tuple[str, bytes, x509.Certificate]],
    now: dt.datetime,
) -> Serials:
    """The usable links in ``data`` for ``previous`` (newest first, as ``order_previous``
    gives them): each signed by its earlier CA, holding the key of the CA that followed
    it, and not expired."""
    out: list[tuple[str, bytes]] = []
    successor = current
    for serial, _, cert in previous:
        pem = data.get(link_key(serial))
        link = load_cert(pem) if pem is not None else None
        if (
            pem is not None
            and link is not None
            and link.not_valid_after_utc > now
            and same_key(link, successor)
            and issued_by(link, cert)
        ):
            out.append((serial, pem))
        successor = cert
    return tuple(out)


class CAChain:
    """What a CA and the earlier ones it keeps trusted give the Envoys: the serial, the
    bundle (current first, then earlier newest first) and the chain of links. Shared by
    ``StoredCA`` (read here) and ``atlasd.reconcile.certs.CA`` (the one that signs)."""

    cert: x509.Certificate
    material: CertKey
    revision: int
    # (serial, PEM) of earlier CAs still trusted, newest first.
    previous: Serials
    # (serial of an earlier CA, PEM of the link it signed): see the module docstring.
    links: Serials

    @functools.cached_property
    def serial(self) -> str:
        return str(self.cert.serial_number)

    @functools.cached_property
    def bundle(self) -> bytes:
        return self.material.cert_pem + b"".join(pem for _, pem in self.previous)

    @functools.cached_property
    def chain(self) -> bytes:
        """The links from this CA back to the earlier ones (``model.PKI.chain``)."""
        return chain_of(self.previous, self.links)


@dataclass(frozen=True)
class StoredCA(CAChain):
    """``atlas-ca`` as stored: the current CA and the earlier ones still trusted."""

    cert: x509.Certificate
    material: CertKey
    revision: int
    previous: Serials
    # Every CA certificate a leaf may be signed by (current first).
    trusted: tuple[x509.Certificate, ...]
    links: Serials = ()

    @property
    def earlier(self) -> list[tuple[str, bytes, x509.Certificate]]:
        """(serial, PEM, certificate) of the earlier CAs, newest first."""
        return [(s, pem, c) for (s, pem), c in zip(self.previous, self.trusted[1:], strict=True)]


def revision_of(secret: Mapping[str, Any] | None) -> int:
    """``goatlas.io/ca-revision`` as a positive integer (1 when absent or malformed)."""
    text = bodies.label(secret, labels.CA_REVISION_LABEL) or "1"
    return max(int(text), 1) if text.isdigit() else 1


def previous_cas(
    data: Mapping[str, bytes], current_serial: str, now: dt.datetime
) -> list[tuple[str, bytes, x509.Certificate]]:
    """Earlier CAs in ``data`` that are still valid at ``now`` and named by their serial."""
    out: list[tuple[str, bytes, x509.Certificate]] = []
    for k, pem in data.items():
        if not (k.startswith("ca-") and k.endswith(".pem")) or k == CA_KEY_KEY:
            continue
        if k.startswith(LINK_PREFIX):
            continue
        serial = k[3:-4]
        if serial == current_serial:
            continue
        cert = load_cert(pem)
        if cert is None or cert.not_valid_after_utc <= now or str(cert.serial_number) != serial:
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
    sign (``atlasd.reconcile.pki.signing_ca``); reading what is trusted needs only certificates.
    """
    data = secret_data(secret or {})
    if CA_CERT_KEY not in data or CA_KEY_KEY not in data:
        return None
    cert = load_cert(data[CA_CERT_KEY])
    if cert is None:
        return None
    serial = str(cert.serial_number)
    previous = order_previous(previous_cas(data, serial, now))[:EARLIER_KEPT]
    return StoredCA(
        cert=cert,
        material=CertKey(data[CA_CERT_KEY], data[CA_KEY_KEY]),
        revision=revision_of(secret),
        previous=tuple((s, pem) for s, pem, _ in previous),
        trusted=(cert, *(c for _, _, c in previous)),
        links=read_links(data, cert, previous, now),
    )


def stored_pair(data: Mapping[str, bytes], cert_key: str, key_key: str) -> CertKey | None:
    """The (certificate, key) stored under ``cert_key``/``key_key``; None unless both are."""
    if cert_key in data and key_key in data:
        return CertKey(data[cert_key], data[key_key])
    return None


def trusted_pair(
    data: Mapping[str, bytes],
    cert_key: str,
    key_key: str,
    trusted: tuple[x509.Certificate, ...],
) -> CertKey | None:
    """``stored_pair`` if a trusted CA signed the certificate; None otherwise."""
    pair = stored_pair(data, cert_key, key_key)
    if pair is None or not issued_by_any(pair.cert_pem, trusted):
        return None
    return pair
