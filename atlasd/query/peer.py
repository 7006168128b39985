"""The probes' own TLS: presenting an identity, telling which side refused a handshake,
and reading the certificate a downstream Envoy presents.

``client_tls`` dials the observability Envoy as a downstream Envoy does (the Alertmanager
route); ``tls_refusal`` says what a failed handshake of the probe's own means;
``Finding.refused`` names whose certificate was refused (``DOWNSTREAM``,
``OBSERVABILITY``).

``presented_certificate`` and ``describe``: when the observability Envoy refused a downstream Envoy's certificate, Envoy's reason
says why (no local issuer: another CA; expired) but not whose certificate it was. The
observer then makes one TLS handshake of its own to the address the observability Envoy
dials (the cluster's external IP and Thanos port), presenting the observability
Envoy's client certificate as it does, and reads the certificate offered: nothing is
verified here (the point is to see what is wrong), nothing but the certificate is used,
and the connection is closed at once. ``describe`` says what it is against atlasd's
trust bundle: its issuer, subject, names and expiry, and whether atlasd's CA signed it.
Only public certificate fields ever reach a message.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile

import trio
from cryptography import x509

from atlasd.certpolicy import issued_by, load_certs
from atlasd.heap import release_tls
from atlasd.model import CertKey

# Finding.refused: whose certificate a refused handshake refused.
DOWNSTREAM = "downstream"  # the downstream Envoy's (or the cluster's, on the alert route)
OBSERVABILITY = "observability"  # the observability Envoy's


def load_identity(ctx: ssl.SSLContext, identity: CertKey) -> None:
    """Present ``identity`` on ``ctx``'s connections. ``ssl`` loads a key from a file
    only: a private directory (0700, the files 0600), removed once loaded."""
    with tempfile.TemporaryDirectory(prefix="atlasd-probe-") as d:
        cert, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        for path, pem in ((cert, identity.cert_pem), (key, identity.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        ctx.load_cert_chain(cert, key)


def client_tls(identity: CertKey, trust: bytes) -> ssl.SSLContext:
    """TLS as a downstream Envoy dials the observability Envoy: ``identity`` presented,
    the server verified against ``trust``, at most TLS 1.2 (Envoy's upstream default)."""
    ctx = ssl.create_default_context(cadata=trust.decode("ascii"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    load_identity(ctx, identity)
    return ctx


def tls_refusal(exc: BaseException, *, peer: str) -> tuple[str, str] | None:
    """What a failed TLS handshake of the probe's own with ``peer`` (the observability
    Envoy) says, and whose certificate was refused (None: it was no TLS failure): the
    probe refused the observability Envoy's, or it refused the probe's (the cluster's)
    and sent an alert."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError):
            why = cur.verify_message or str(cur)
            said = f"{peer} presents a certificate that does not verify ({why}): refused"
            return said, OBSERVABILITY
        if isinstance(cur, ssl.SSLError):
            reason = cur.reason or str(cur)
            if "ALERT" in reason:
                name = reason.partition("ALERT_")[2].replace("_", " ").lower()
                said = f"{peer} refused the certificate presented to it (TLS alert {name!r})"
                return said, DOWNSTREAM
            return f"the TLS handshake with {peer} failed ({reason})", ""
        cur = cur.__cause__ or cur.__context__
    return None


async def presented_certificate(
    host: str, port: int, *, within: float, identity: CertKey | None = None
) -> x509.Certificate | None:
    """The certificate the TLS server at ``host:port`` presents (None: no handshake
    within ``within`` seconds). With TLS 1.3 (Envoy's server default) the server's
    certificate arrives before it judges ours, so a server refusing ``identity`` (or its
    absence) still shows its own."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if identity is not None:
        load_identity(ctx, identity)
    with trio.move_on_after(within):
        try:
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ctx)
        except OSError:
            return None
        try:
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
        except (trio.BrokenResourceError, ssl.SSLError, OSError):
            return None
        finally:
            await trio.aclose_forcefully(stream)
            release_tls(stream)
        return x509.load_der_x509_certificate(der) if der else None
    return None


def describe(cert: x509.Certificate, *, trust_bundle: bytes, now: dt.datetime) -> str:
    """What ``cert`` is, against atlasd's ``trust_bundle`` (pure): issuer, subject, DNS
    names, expiry, and atlasd's CA when another CA signed it."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = ", ".join(sans.value.get_values_for_type(x509.DNSName)) or "none"
    except x509.ExtensionNotFound:
        names = "none"
    until = cert.not_valid_after_utc
    expiry = (
        f"expired {until:%Y-%m-%d %H:%M} UTC" if until < now else f"valid until {until:%Y-%m-%d}"
    )
    said = (
        f"issuer {cert.issuer.rfc4514_string() or '(empty)'}, subject "
        f"{cert.subject.rfc4514_string() or '(empty)'}, names {names}, {expiry}"
    )
    cas = load_certs(trust_bundle)
    if any(issued_by(cert, ca) for ca in cas):
        return f"{said}; signed by atlasd's CA"
    ours = f" ({cas[0].subject.rfc4514_string()})" if cas else ""
    return f"{said}; not signed by atlasd's CA{ours}"
