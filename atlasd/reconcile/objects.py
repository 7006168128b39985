"""Wire shapes of the Kubernetes objects atlasd writes, and helpers to build and read them.

Pure: builds plain dicts (what the API server takes as JSON); Secret data is encoded and
decoded by ``atlasd.kube.secrets``.
Every object atlasd owns carries ``app.kubernetes.io/managed-by: atlasd``; an object that
belongs to one downstream cluster also carries ``goatlas.io/owner-cluster: <cluster>`` and
(when the cluster Service's uid is known) an ownerReference to that Service. The applier
prunes by those labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

from atlasd import labels
from atlasd.kube import bodies
from atlasd.kube.secrets import encode_secret_data
from atlasd.model import DownstreamCluster


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[dict[str, Any]]
    resourceVersion: str
    uid: str


class SecretObject(TypedDict):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    type: str
    data: dict[str, str]


class ServiceObject(TypedDict):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: dict[str, Any]
    status: NotRequired[dict[str, Any]]


def managed_labels(cluster: str | None = None, **extra: str) -> dict[str, str]:
    """Ownership labels: managed-by always, owner-cluster for per-cluster objects."""
    out = {labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE}
    if cluster is not None:
        out[labels.OWNER_CLUSTER_LABEL] = cluster
    out.update(extra)
    return out


def owner_references(cluster: DownstreamCluster) -> list[dict[str, Any]]:
    """An ownerReference to the cluster Service (only when its uid is known)."""
    src = cluster.source
    if src is None or not src.uid:
        return []
    return [
        {
            "apiVersion": src.api_version,
            "kind": src.kind,
            "name": src.name,
            "uid": src.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def secret_object(
    *,
    name: str,
    namespace: str,
    data: Mapping[str, bytes],
    obj_labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
    owner_refs: list[dict[str, Any]] | None = None,
    secret_type: str = "Opaque",
) -> SecretObject:
    meta: ObjectMeta = {"name": name, "namespace": namespace, "labels": dict(obj_labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    if owner_refs:
        meta["ownerReferences"] = owner_refs
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": secret_type,
        "data": encode_secret_data(data),
    }


def meta_map(
    obj: Mapping[str, Any] | None, key: Literal["labels", "annotations"]
) -> dict[str, str]:
    """``metadata.labels`` / ``metadata.annotations`` of an observed object as a new dict of
    strings (to build the object written back)."""
    raw = bodies.labels(obj) if key == "labels" else bodies.annotations(obj)
    return {str(k): str(v) for k, v in raw.items()}
