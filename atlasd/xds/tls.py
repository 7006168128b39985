"""TLS on atlasd's ADS port: the server's SSL context, renewed without a restart, and what
a connection's verified client certificate names.

``ServerTls`` holds the current context. ``update`` is given atlasd's ADS server
certificate (Secret ``atlasd-ads``), the cross-signed chain that follows it and the trust
bundle whenever the fleet changes; it builds a new context only when they differ. Every new
connection takes the context current at its handshake; open connections keep theirs (they
were authenticated when they were made). Until atlasd has a certificate (a first start,
before the leader has written one) TLS connections are closed at once.

The context asks for a client certificate and verifies one if given
(``CERT_OPTIONAL``): a caller without one gets a gRPC ``PERMISSION_DENIED`` saying what to
present, rather than a bare handshake failure. OpenSSL checks that a client certificate is
meant for client authentication, so a server-only certificate is refused in the handshake.

The private key is handed to OpenSSL through an anonymous in-memory file (``memfd``) and
never touches a disk.

Errors: a certificate and key OpenSSL refuses raise ``ssl.SSLError`` (its message names no
key material); ``update`` logs it and keeps the previous context.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlasd.model import CertKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsMaterial:
    """What the ADS server's TLS is made of."""

    cert: CertKey  # the server certificate (leaf) and its key
    chain: bytes  # the cross-signed links that follow the leaf (``model.PKI.chain``)
    trust: bytes = field(repr=False)  # the CA bundle client certificates are verified with


@contextlib.contextmanager
def _key_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths OpenSSL can read the certificate chain and key from, gone on exit: anonymous
    in-memory files where the system has them, else a private temporary directory."""
    if hasattr(os, "memfd_create"):
        fds: list[int] = []
        try:
            for data in (cert_pem, key_pem):
                fd = os.memfd_create("atlasd-ads", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="atlasd-ads-") as tmp:  # pragma: no cover
        cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        cert.write_bytes(cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        yield str(cert), str(key)


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    """An SSL context serving ``material`` (HTTP/2 only, TLS 1.2 or later), asking for a
    client certificate and verifying it against the trust bundle when one is given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=material.trust.decode("ascii"))
    with _key_files(material.cert.cert_pem + material.chain, material.cert.key_pem) as (c, k):
        ctx.load_cert_chain(c, k)
    return ctx


class ServerTls:
    """The ADS server's current SSL context (None until there is a certificate).

    Invariant: ``context`` serves ``_material`` (or is None when it is None).
    """

    def __init__(self) -> None:
        self._material: TlsMaterial | None = None
        self.context: ssl.SSLContext | None = None

    def update(self, material: TlsMaterial | None) -> bool:
        """Serve ``material`` from the next handshake on; True if the context changed."""
        if material == self._material:
            return False
        if material is None:
            self._material, self.context = None, None
            return True
        try:
            context = server_context(material)
        except (ssl.SSLError, ValueError) as exc:
            log.error("xds: cannot serve TLS with the ADS server certificate: %s", exc)
            return False
        self._material, self.context = material, context
        log.info("xds: ADS server TLS certificate loaded")
        return True


def peer_names(cert: Mapping[str, Any] | None) -> frozenset[str]:
    """The DNS SANs of a verified peer certificate (``SSLObject.getpeercert()``; None or
    empty when the peer presented none)."""
    if not cert:
        return frozenset()
    return frozenset(str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
