"""Join-token records in the API: one Secret ``atlas-join-<id>`` per token (key
``token.json``: the cluster, the secret's SHA-256, expiry, use; ``atlasd.enroll.token``).

One Secret per token, not one list: a thousand agents enrolling at once each write their
own record, none conflicts with another. A use is a conditional replace (the
resourceVersion read), so of two requests with one token exactly one wins; the other
gets a Conflict and is refused as a replay. Records of a cluster that are used or expired
are deleted when the next token of that cluster is minted.

The Secrets carry no ``app.kubernetes.io/managed-by: atlasd`` label: they are not part of
any cluster's desired state (the reconciler neither watches nor prunes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509

from atlasd import labels
from atlasd.certpolicy import load_cert, not_after, public_der
from atlasd.enroll import token as tokens
from atlasd.enroll.token import JoinToken, Record, Refused
from atlasd.kube import bodies
from atlasd.kube.api import KubeApi, Obj
from atlasd.kube.errors import Conflict, NotFound
from atlasd.kube.resources import SECRETS
from atlasd.kube.secrets import encode_secret_data, secret_data
from atlasd.reconcile.enrolled import enrolled_secret_name


def record_secret(
    token_id: str, record: Record, *, namespace: str, resource_version: str = ""
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": tokens.secret_name(token_id),
        "namespace": namespace,
        "labels": {labels.PART_OF_LABEL: "atlasd", tokens.CLUSTER_LABEL: record.cluster},
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": encode_secret_data({tokens.RECORD_KEY: record.dump()}),
    }


async def mint(
    api: KubeApi,
    cluster: str,
    *,
    namespace: str,
    ca_cert: x509.Certificate,
    now: dt.datetime,
    ttl: dt.timedelta = tokens.DEFAULT_TTL,
) -> tuple[JoinToken, Record]:
    """A new token for ``cluster`` (its record created); the cluster's used or expired
    records are deleted."""
    await _prune(api, cluster, namespace=namespace, now=now)
    for _ in range(5):
        token = tokens.mint(ca_cert)
        record = tokens.new_record(token, cluster, now=now, ttl=ttl)
        try:
            await api.create(record_secret(token.id, record, namespace=namespace))
        except Conflict:  # an id taken already (AlreadyExists): draw another
            continue
        return token, record
    raise RuntimeError("could not draw an unused join token id")


async def _prune(api: KubeApi, cluster: str, *, namespace: str, now: dt.datetime) -> None:
    found, _ = await api.list(
        SECRETS, namespace=namespace, label_selector=f"{tokens.CLUSTER_LABEL}={cluster}"
    )
    for obj in found:
        try:
            record = Record.load(secret_data(obj).get(tokens.RECORD_KEY))
        except Refused:
            continue
        if _spent(record, now):
            with contextlib.suppress(NotFound):
                await api.delete(SECRETS, bodies.name(obj), namespace=namespace)


def _same_keys(record: Record, keys: Mapping[str, bytes]) -> bool:
    recorded = {}
    for kind, pem in record.certificates:
        cert = load_cert(pem.encode())
        if cert is None:
            return False
        recorded[kind] = public_der(cert.public_key())
    return recorded == dict(keys)


def _spent(record: Record, now: dt.datetime) -> bool:
    """Whether a record may go: an unused token past its expiry, or a used one whose
    certificates have all expired (until then `revoke` reads them here)."""
    if record.used is None:
        return now >= record.expires
    ends = [not_after(pem.encode()) for _, pem in record.certificates]
    return all(t is not None and t <= now.timestamp() for t in ends)


async def load(api: KubeApi, token: JoinToken, *, namespace: str) -> tuple[Record, Obj]:
    """The record of ``token`` and the Secret holding it; ``Refused`` (401) if none."""
    try:
        obj = await api.get(SECRETS, tokens.secret_name(token.id), namespace=namespace)
    except NotFound as exc:
        raise Refused(401, "unknown join token") from exc
    return Record.load(secret_data(obj).get(tokens.RECORD_KEY)), obj


async def consume(
    api: KubeApi,
    token: JoinToken,
    *,
    cluster: str,
    namespace: str,
    now: dt.datetime,
    sign: Callable[[], Mapping[str, bytes]],
    keys: Mapping[str, bytes] | None = None,
) -> dict[str, bytes]:
    """Check ``token`` for ``cluster``, then mark it used, once, together with the
    certificates ``sign()`` makes (one conditional write); the certificates, or
    ``Refused``. A use that loses the race is refused and its certificates are never
    returned. ``keys`` (kind -> public key DER of the requests): a used token asked again
    for exactly the keys it was used for answers the certificates recorded then."""
    record, obj = await load(api, token, namespace=namespace)
    if record.used is not None and keys and _same_keys(record, keys):
        # The agent asking again for the keys it was signed for (its answer was lost):
        # the same certificates, nothing new. Whoever else holds the token and the
        # public requests gets certificates useless without the private keys.
        tokens.check(
            dataclasses.replace(record, used=None), token, cluster=cluster, now=record.used
        )
        return {kind: pem.encode() for kind, pem in record.certificates}
    tokens.check(record, token, cluster=cluster, now=now)
    certs = dict(sign())
    used = Record(
        cluster=record.cluster,
        digest=record.digest,
        expires=record.expires,
        used=now.astimezone(dt.UTC).replace(microsecond=0),
        certificates=tuple(sorted((k, v.decode()) for k, v in certs.items())),
    )
    body = record_secret(
        token.id, used, namespace=namespace, resource_version=bodies.resource_version(obj)
    )
    try:
        await api.replace(body)
    except (Conflict, NotFound) as exc:  # another request used (or pruned) it first
        if keys and isinstance(exc, Conflict):
            # Perhaps this agent's own earlier request, which it stopped waiting for.
            again, _ = await load(api, token, namespace=namespace)
            if again.used is not None and _same_keys(again, keys):
                return {kind: pem.encode() for kind, pem in again.certificates}
        raise Refused(409, "the join token was already used") from exc
    return certs


async def issued(api: KubeApi, cluster: str, *, namespace: str) -> list[tuple[str, bytes]]:
    """(kind, PEM) of the certificates signed for ``cluster`` that atlasd still knows of:
    those of its used tokens (kept until they expire) and of every renewal still valid."""
    out: list[tuple[str, bytes]] = []
    found, _ = await api.list(
        SECRETS, namespace=namespace, label_selector=f"{tokens.CLUSTER_LABEL}={cluster}"
    )
    for obj in sorted(found, key=bodies.name):
        if bodies.name(obj) == enrolled_secret_name(cluster):
            data = secret_data(obj)
            # ``<kind>-<serial>.crt`` (``<kind>.crt`` before every renewal was kept).
            out += [
                (k.removesuffix(".crt").split("-", 1)[0], v)
                for k, v in sorted(data.items())
                if k.endswith(".crt")
            ]
            continue
        try:
            record = Record.load(secret_data(obj).get(tokens.RECORD_KEY))
        except Refused:
            continue
        out += [(kind, pem.encode()) for kind, pem in record.certificates]
    return out


async def forget(api: KubeApi, cluster: str, *, namespace: str) -> int:
    """Delete every enrollment Secret of ``cluster`` (its join-token records, used or not,
    and ``<c>-atlas-enrolled``): for ``atlasd cluster remove``, once their certificates
    are revoked. The number deleted."""
    found, _ = await api.list(
        SECRETS, namespace=namespace, label_selector=f"{tokens.CLUSTER_LABEL}={cluster}"
    )
    deleted = 0
    for obj in found:
        with contextlib.suppress(NotFound):
            await api.delete(SECRETS, bodies.name(obj), namespace=namespace)
            deleted += 1
    return deleted
