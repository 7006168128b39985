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
import datetime as dt
from typing import Any

from cryptography import x509

from atlasd.enroll import token as tokens
from atlasd.enroll.token import JoinToken, Record, Refused
from atlasd.kube import bodies
from atlasd.kube.api import KubeApi, Obj
from atlasd.kube.errors import Conflict, NotFound
from atlasd.kube.resources import SECRETS
from atlasd.kube.secrets import encode_secret_data, secret_data

PART_OF_LABEL = "app.kubernetes.io/part-of"


def record_secret(
    token_id: str, record: Record, *, namespace: str, resource_version: str = ""
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": tokens.secret_name(token_id),
        "namespace": namespace,
        "labels": {PART_OF_LABEL: "atlasd", tokens.CLUSTER_LABEL: record.cluster},
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
        if record.used is not None or now >= record.expires:
            with contextlib.suppress(NotFound):
                await api.delete(SECRETS, bodies.name(obj), namespace=namespace)


async def load(api: KubeApi, token: JoinToken, *, namespace: str) -> tuple[Record, Obj]:
    """The record of ``token`` and the Secret holding it; ``Refused`` (401) if none."""
    try:
        obj = await api.get(SECRETS, tokens.secret_name(token.id), namespace=namespace)
    except NotFound as exc:
        raise Refused(401, "unknown join token") from exc
    return Record.load(secret_data(obj).get(tokens.RECORD_KEY)), obj


async def consume(
    api: KubeApi, token: JoinToken, *, cluster: str, namespace: str, now: dt.datetime
) -> Record:
    """Check ``token`` for ``cluster`` and mark it used, once (``Refused`` otherwise)."""
    record, obj = await load(api, token, namespace=namespace)
    tokens.check(record, token, cluster=cluster, now=now)
    used = Record(
        cluster=record.cluster,
        digest=record.digest,
        expires=record.expires,
        used=now.astimezone(dt.UTC).replace(microsecond=0),
    )
    body = record_secret(
        token.id, used, namespace=namespace, resource_version=bodies.resource_version(obj)
    )
    try:
        await api.replace(body)
    except (Conflict, NotFound) as exc:  # another request used (or pruned) it first
        raise Refused(409, "the join token was already used") from exc
    return used


ENROLLED_SUFFIX = "-atlas-enrolled"


def enrolled_secret_name(cluster: str) -> str:
    """The Secret holding the certificates (public, no key) last signed for ``cluster``
    by the endpoint: what ``atlasd cluster revoke`` revokes in enrollment mode."""
    return f"{cluster}{ENROLLED_SUFFIX}"


async def record_issued(
    api: KubeApi, cluster: str, certs: dict[str, bytes], *, namespace: str
) -> None:
    """Store the certificates just signed for ``cluster`` (``<c>-atlas-enrolled``, keys
    ``server.crt``/``client.crt``; certificates only, never a key)."""
    obj = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": enrolled_secret_name(cluster),
            "namespace": namespace,
            "labels": {PART_OF_LABEL: "atlasd", tokens.CLUSTER_LABEL: cluster},
        },
        "type": "Opaque",
        "data": encode_secret_data({f"{kind}.crt": pem for kind, pem in certs.items()}),
    }
    await api.apply(obj)


async def issued(api: KubeApi, cluster: str, *, namespace: str) -> dict[str, bytes]:
    """The certificates last signed for ``cluster`` by kind (empty: never enrolled)."""
    try:
        obj = await api.get(SECRETS, enrolled_secret_name(cluster), namespace=namespace)
    except NotFound:
        return {}
    data = secret_data(obj)
    return {k.removesuffix(".crt"): v for k, v in data.items() if k.endswith(".crt")}
