"""Who may fetch which node's resources (docs/xds-authorization.md; docs/interface.md, "beyond" 9).

Two ways in:

- **Forwarded** (downstream Envoys): they connect over mTLS to the observability Envoy's
  10900 listener, which requires a CA-signed client certificate, replaces any incoming
  ``x-forwarded-client-cert`` by the one it verified (SANITIZE_SET, DNS and URI SANs) and
  forwards to atlasd. atlasd allows the stream only if a DNS SAN equals the node id the
  Envoy asks for.
- **Direct** (the observability Envoy itself, in-cluster, plaintext): no XFCC header;
  allowed only for the nodes in ``direct_nodes`` (default ``atlas``).

If a forwarder token is configured, every stream must carry it in
``x-atlasd-forwarder-token`` (the observability Envoy adds it on both paths; its route
strips any incoming copy), so a pod that can reach atlasd's plaintext port but is not
the observability Envoy can neither claim ``atlas`` nor forge an XFCC header.

Errors::

    Exception
     └── Denied   (reason is safe to log and to return as the gRPC status message)
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

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


def parse_xfcc(header: str) -> list[list[tuple[str, str]]]:
    """Parse ``x-forwarded-client-cert`` into elements of (key, value) pairs."""
    elements = []
    for element in _split(header, ","):
        pairs = []
        for part in _split(element, ";"):
            key, sep, value = part.strip().partition("=")
            if not sep:
                continue
            pairs.append((key.strip().lower(), _unquote(value.strip())))
        elements.append(pairs)
    return elements


@dataclass(frozen=True)
class Authorizer:
    """Decides, from a stream's request headers, whether it may fetch ``node``."""

    forwarder_token: str | None = None
    direct_nodes: frozenset[str] = frozenset({model.OBSERVABILITY_NODE})

    def __repr__(self) -> str:
        return f"Authorizer(token={'set' if self.forwarder_token else 'unset'}, direct={sorted(self.direct_nodes)})"

    def authorize(self, node: str, headers: Iterable[tuple[str, str]]) -> str:
        """Return a description of the verified caller, or raise ``Denied``."""
        xfcc: list[str] = []
        tokens: list[str] = []
        for k, v in headers:
            k = k.lower()
            if k == XFCC_HEADER:
                xfcc.append(v)
            elif k == TOKEN_HEADER:
                tokens.append(v)
        if self.forwarder_token is not None and not (
            len(tokens) == 1 and hmac.compare_digest(tokens[0], self.forwarder_token)
        ):
            raise Denied("missing or wrong forwarder token")
        if not xfcc:
            if node in self.direct_nodes:
                return f"direct:{node}"
            raise Denied(
                f"node {node!r} must connect through the observability Envoy with its certificate"
            )
        elements = parse_xfcc(",".join(xfcc))
        if len(elements) != 1:
            raise Denied("expected exactly one forwarded client certificate")
        dns = [v for k, v in elements[0] if k == "dns"]
        if node not in dns:
            raise Denied(f"client certificate does not name node {node!r}")
        return f"cert:{node}"
