"""Who may fetch which node's resources (docs/xds-authorization.md; docs/interface.md, "beyond" 9).

A stream's caller is known by what its connection and headers prove:

- **its client certificate** (TLS connections to atlasd's ADS port; ``atlasd.xds.tls``): a
  certificate of atlasd's CA, verified in the handshake, whose DNS SANs name a node. Such a
  caller may fetch the node its certificate names.
- **the forwarder token** (the fallback for plaintext connections): exactly one
  ``x-atlasd-forwarder-token`` header equal to the configured token.

The **forwarder** is the observability Envoy: a caller whose verified certificate names
``atlas`` (its ``atlas-client`` certificate), or that presents the forwarder token. Only
the forwarder's streams may carry ``x-forwarded-client-cert``: its 10900 listener verified
a downstream Envoy's client certificate, replaced any incoming XFCC with one describing it
(SANITIZE_SET, DNS and URI SANs) and forwarded the stream; such a stream may fetch the node
that certificate names. XFCC from anyone else, a plaintext caller without the token, a
wrong or repeated token: refused. With no token configured, plaintext callers are never
trusted.

A **revoked** client certificate (``RevokedCerts``: the SHA-256 of every certificate
revoked and in force, ``atlasd.revocation``) is refused however it is presented: on the
connection, or forwarded (the XFCC element's ``Hash``, which the observability Envoy always
sets). ``presented`` says which certificate a stream stands on, so the ADS server ends a
stream whose certificate is revoked after it opened.

Errors::

    Exception
     └── Denied   (reason is safe to log and to return as the gRPC status message)
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from atlasd import model
from atlasd.labels import FORWARDER_TOKEN_HEADER

XFCC_HEADER = "x-forwarded-client-cert"
TOKEN_HEADER = FORWARDER_TOKEN_HEADER


class Denied(Exception):
    """The caller may not fetch the node it asked for."""


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (XFCC quotes values holding , ; =)."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"')
    return value


# A stream's header is read three times as it opens (the certificate it stands on, then
# its authorization, which checks that certificate again), character by character: each
# header is parsed once. It holds what the certificate states (hash, subject, SANs), no
# secret.
@functools.lru_cache(maxsize=256)
def parse_xfcc(header: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Parse ``x-forwarded-client-cert`` into elements of (key, value) pairs."""
    elements = []
    for element in _split(header, ","):
        pairs = []
        for part in _split(element, ";"):
            key, sep, value = part.strip().partition("=")
            if not sep:
                continue
            pairs.append((key.strip().lower(), _unquote(value.strip())))
        elements.append(tuple(pairs))
    return tuple(elements)


class RevokedCerts:
    """The SHA-256 (lowercase hex, of the DER) of every revoked certificate in force.

    Invariant: ``hashes`` is replaced whole (by the xDS subsystem, from each fleet
    version), never mutated, so a reader on another thread sees one version or the next.
    """

    def __init__(self, hashes: Iterable[str] = ()) -> None:
        self.hashes: frozenset[str] = frozenset(hashes)

    def update(self, revocations: Mapping[str, model.Revocation]) -> set[str]:
        """Hold the hashes of ``revocations``; returns the clusters with a hash that is
        new (their streams are to be woken: one may stand on it)."""
        hashes = frozenset(h for r in revocations.values() for h in r.hashes)
        if hashes == self.hashes:
            return set()
        before, self.hashes = self.hashes, hashes
        return {name for name, r in revocations.items() if r.hashes - before}

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and sha256.lower() in self.hashes


def presented(headers: Iterable[tuple[str, str]], peer_hash: str | None) -> str | None:
    """The SHA-256 of the client certificate a stream stands on: the forwarded one (the
    XFCC element's ``Hash``) if any, else the connection's own (``peer_hash``)."""
    xfcc = [v for k, v in headers if k.lower() == XFCC_HEADER]
    if xfcc:
        elements = parse_xfcc(",".join(xfcc))
        if len(elements) == 1:
            found = [v for k, v in elements[0] if k == "hash"]
            return found[0].lower() if len(found) == 1 else None
        return None
    return peer_hash


@dataclass(frozen=True)
class Authorizer:
    """Decides, from what a stream's connection and headers prove, whether it may fetch
    ``node``."""

    forwarder_token: str | None = None
    forwarder: str = model.OBSERVABILITY_NODE
    revoked: RevokedCerts = field(default_factory=RevokedCerts)

    def __repr__(self) -> str:
        return f"Authorizer(token={'set' if self.forwarder_token else 'unset'}, forwarder={self.forwarder!r})"

    def authorize(
        self,
        node: str,
        headers: Iterable[tuple[str, str]],
        peer: frozenset[str] = frozenset(),
        peer_hash: str | None = None,
    ) -> str:
        """Return a description of the verified caller, or raise ``Denied``.

        ``peer``: the DNS SANs of the client certificate the connection's TLS handshake
        verified (empty: plaintext, or TLS without a client certificate); ``peer_hash``:
        that certificate's SHA-256 (hex).
        """
        headers = list(headers)
        if peer_hash is not None and peer_hash in self.revoked:
            raise Denied("client certificate revoked")
        xfcc: list[str] = []
        tokens: list[str] = []
        for k, v in headers:
            k = k.lower()
            if k == XFCC_HEADER:
                xfcc.append(v)
            elif k == TOKEN_HEADER:
                tokens.append(v)
        by_token = False
        if tokens and self.forwarder_token is not None:
            if not (len(tokens) == 1 and hmac.compare_digest(tokens[0], self.forwarder_token)):
                raise Denied("wrong forwarder token")
            by_token = True
        by_cert = self.forwarder in peer
        how = "certificate" if by_cert else "token"
        if xfcc:
            if not (by_cert or by_token):
                raise Denied(
                    "x-forwarded-client-cert is honoured only from the observability Envoy "
                    "(its client certificate over TLS, or the forwarder token)"
                )
            elements = parse_xfcc(",".join(xfcc))
            if len(elements) != 1:
                raise Denied("expected exactly one forwarded client certificate")
            dns = [v for k, v in elements[0] if k == "dns"]
            if node not in dns:
                raise Denied(f"client certificate does not name node {node!r}")
            if presented(headers, None) in self.revoked:
                raise Denied(f"client certificate of node {node!r} revoked")
            return f"forwarded:{node} (forwarder {how})"
        if node in peer:
            return f"certificate:{node}"
        if by_token and node == self.forwarder:
            return f"token:{node}"
        if node == self.forwarder:
            raise Denied(
                f"node {node!r} must present its client certificate over TLS "
                "(or the forwarder token)"
            )
        raise Denied(
            f"node {node!r} must connect through the observability Envoy with its certificate"
        )
