"""One-time join tokens: their text, their stored record, and the checks of a use.

A token reads ``<id>.<secret>.<pin>`` (kubeadm's bootstrap token with its
``--discovery-token-ca-cert-hash`` folded in):

- ``id``: 6 characters ``[a-z0-9]``, public; it names the record (Secret
  ``atlas-join-<id>``);
- ``secret``: 32 characters ``[a-z2-7]`` (160 random bits); only its SHA-256 is stored;
- ``pin``: the SHA-256 (hex) of the current CA's SubjectPublicKeyInfo, so the agent can
  check the server's trust bundle on first contact, before it trusts anything.

A record binds the token to one cluster, an expiry (default one hour) and whether it was
used; a use is accepted once (the endpoint marks it used with a conditional write before
it signs). Nothing here logs or returns the secret.

Pure: the standard library and ``cryptography``.

Errors::

    Exception
     └── Refused   (status: the HTTP status of the refusal; message safe to log and return)
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from atlasd import labels
from atlasd.certpolicy import load_certs
from atlasd.times import parse_rfc3339, rfc3339

DEFAULT_TTL = dt.timedelta(hours=1)
MAX_TTL = dt.timedelta(days=7)
SECRET_PREFIX = "atlas-join-"
RECORD_KEY = "token.json"
# The label every token record carries: the cluster it is bound to.
CLUSTER_LABEL = labels.ENROLLMENT_CLUSTER_LABEL

_ID = re.compile(r"[a-z0-9]{6}")
_SECRET = re.compile(r"[a-z2-7]{32}")
_PIN = re.compile(r"[0-9a-f]{64}")


class Refused(Exception):
    """An enrollment that is not accepted; ``str()`` names why and never a secret."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class JoinToken:
    id: str
    secret: str
    pin: str

    def __repr__(self) -> str:  # never the secret
        return f"JoinToken(id={self.id!r})"

    def __str__(self) -> str:
        return f"{self.id}.{self.secret}.{self.pin}"

    @property
    def digest(self) -> str:
        return digest(self.secret)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def ca_pin(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of a CA certificate's SubjectPublicKeyInfo (DER)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def bundle_matches(bundle_pem: bytes, pin: str) -> bool:
    """Whether a CA of ``bundle_pem`` has the pinned public key."""
    return any(hmac.compare_digest(ca_pin(c), pin) for c in load_certs(bundle_pem))


def mint(ca_cert: x509.Certificate) -> JoinToken:
    return JoinToken(
        id="".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6)),
        secret=base64.b32encode(secrets.token_bytes(20)).decode().lower(),
        pin=ca_pin(ca_cert),
    )


def parse(text: str) -> JoinToken:
    """A token from its text (surrounding whitespace ignored); ``Refused`` (401) if it is
    not one, naming no part of it."""
    parts = text.strip().split(".")
    if (
        len(parts) != 3
        or not _ID.fullmatch(parts[0])
        or not _SECRET.fullmatch(parts[1])
        or not _PIN.fullmatch(parts[2])
    ):
        raise Refused(401, "malformed join token")
    return JoinToken(*parts)


def secret_name(token_id: str) -> str:
    return f"{SECRET_PREFIX}{token_id}"


@dataclass(frozen=True)
class Record:
    """What is stored of a token: the cluster, the secret's SHA-256, expiry, use."""

    cluster: str
    digest: str
    expires: dt.datetime
    used: dt.datetime | None = None
    # The certificates (PEM, no key) signed for the use, by leaf kind: written with the
    # use itself (one write), read by `atlasd cluster revoke`.
    certificates: tuple[tuple[str, str], ...] = ()

    def dump(self) -> bytes:
        doc = {
            "cluster": self.cluster,
            "sha256": self.digest,
            "expires": rfc3339(self.expires),
            "used": rfc3339(self.used) if self.used else None,
            "certificates": dict(self.certificates),
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def load(cls, data: bytes | None) -> Record:
        """``Refused`` (401, as an unknown token) when the record does not parse."""
        try:
            doc = json.loads(data or b"")
            used = doc["used"]
            certs = doc.get("certificates") or {}
            return cls(
                cluster=str(doc["cluster"]),
                digest=str(doc["sha256"]),
                expires=parse_rfc3339(doc["expires"]),
                used=parse_rfc3339(used) if used else None,
                certificates=tuple(sorted((str(k), str(v)) for k, v in certs.items())),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise Refused(401, "unknown join token") from exc


def new_record(token: JoinToken, cluster: str, *, now: dt.datetime, ttl: dt.timedelta) -> Record:
    if not dt.timedelta(0) < ttl <= MAX_TTL:
        raise ValueError(f"a join token lives between 1 s and {MAX_TTL}")
    return Record(cluster=cluster, digest=token.digest, expires=_floor(now + ttl))


def check(record: Record, token: JoinToken, *, cluster: str, now: dt.datetime) -> None:
    """Raise ``Refused`` unless ``token`` may enroll ``cluster`` now. The secret is
    compared first (a wrong secret learns nothing of the record), then the binding, the
    expiry and the single use."""
    if not hmac.compare_digest(record.digest, token.digest):
        raise Refused(401, "unknown join token")
    if record.cluster != cluster:
        raise Refused(403, f"the join token is not for cluster {cluster!r}")
    if now >= record.expires:
        raise Refused(401, "the join token has expired")
    if record.used is not None:
        raise Refused(409, "the join token was already used")


def _floor(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(microsecond=0)
