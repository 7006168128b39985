"""``<c>-atlas-enrolled``: the certificates (public, no key) a cluster's Envoy may hold that
atlasd no longer stores with a key: those the enrollment endpoint signed for its renewals,
and those of the identity deleted when the cluster switched to enrollment. What
``atlasd cluster revoke`` revokes beyond the join tokens' records (``atlasd.enroll.store``).

Here, below ``atlasd.enroll``, because both the endpoint and the reconciler (the switch)
write it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from atlasd import labels
from atlasd.certpolicy import load_cert, not_after
from atlasd.kube.api import KubeApi, Obj
from atlasd.kube.conditional import write_conditionally
from atlasd.kube.resources import SECRETS
from atlasd.kube.secrets import encode_secret_data, secret_data

ENROLLED_SUFFIX = "-atlas-enrolled"


def enrolled_secret_name(cluster: str) -> str:
    """The Secret holding the certificates (public, no key) the endpoint signed for
    ``cluster``'s renewals and that are still valid: what ``atlasd cluster revoke``
    revokes in enrollment mode, beside the token records' certificates."""
    return f"{cluster}{ENROLLED_SUFFIX}"


# Certificates kept per cluster in ``<c>-atlas-enrolled`` at most (the newest): a pod holds
# two per kind at a time (one renewed at 2/3 of the other's life), so this is ~30 pods'
# worth; past it the oldest are dropped (they are the nearest to expiring).
RECORDED_MAX = 128
RECORD_TRIES = 8


def _recorded(data: Mapping[str, bytes], now: dt.datetime) -> dict[str, bytes]:
    """The entries of ``<c>-atlas-enrolled`` still valid at ``now`` (by notAfter)."""
    out: dict[str, bytes] = {}
    for key, pem in data.items():
        end = not_after(pem)
        if key.endswith(".crt") and end is not None and end > now.timestamp():
            out[key] = pem
    return out


def _entry_key(kind: str, pem: bytes) -> str:
    cert = load_cert(pem)
    return f"{kind}-{cert.serial_number:x}.crt" if cert is not None else f"{kind}.crt"


async def record_issued(
    api: KubeApi,
    cluster: str,
    certs: dict[str, bytes],
    *,
    namespace: str,
    now: dt.datetime | None = None,
) -> None:
    """Add the certificates just signed for ``cluster`` to ``<c>-atlas-enrolled`` (keys
    ``<kind>-<serial>.crt``; certificates only, never a key), dropping the expired ones:
    every renewal still valid is there, of every pod (two replicas of an Envoy renew
    apart), so ``revoke`` reaches them all. Written conditionally on the version read
    (every atlasd replica serves the endpoint): a concurrent renewal is read again, not
    overwritten."""
    when = now or dt.datetime.now(dt.UTC)
    name = enrolled_secret_name(cluster)
    new = {_entry_key(kind, pem): pem for kind, pem in certs.items()}

    def body(current: Obj | None) -> dict[str, Any]:
        kept = _recorded(secret_data(current), when) if current is not None else {}
        kept.update(new)
        if len(kept) > RECORDED_MAX:
            newest = sorted(kept, key=lambda k: (not_after(kept[k]) or 0.0, k in new))
            kept = {k: kept[k] for k in newest[-RECORDED_MAX:]}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {
                    labels.PART_OF_LABEL: "atlasd",
                    labels.ENROLLMENT_CLUSTER_LABEL: cluster,
                },
            },
            "type": "Opaque",
            "data": encode_secret_data(kept),
        }

    await write_conditionally(
        api, SECRETS, name, namespace=namespace, body=body, tries=RECORD_TRIES
    )
