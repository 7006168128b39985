"""What ``atlasd cluster add|list|remove|values`` do, against Kubernetes or a store.

The Service built here is the interface of SPEC.md: a Service in atlasd's namespace
labeled ``goatlas.io/cluster: "true"`` with ``spec.externalIPs[0]`` and named ports.
It is checked with the daemon's own validator before anything is written, so the CLI
refuses what the daemon would reject, naming the field.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from atlasd import labels
from atlasd.fleet.validate import validate_all
from atlasd.kube.errors import NotFound
from atlasd.kube.resources import SECRETS, SERVICES, Resource
from atlasd.model import Settings
from atlasd.reconcile.values_formats import Format, render

DEFAULT_PORTS: tuple[tuple[str, int], ...] = (
    ("prometheus", 9090),
    ("thanos", 10901),
    ("alertmanager", 9093),
)


class ClusterError(Exception):
    """A CLI request that cannot be carried out; the message says why and how to fix it."""


class ObjectAPI(Protocol):
    """The verbs the CLI needs (KubeClient and FileStore both have them)."""

    async def get(self, res: Resource, name: str, *, namespace: str | None = None) -> Any: ...

    async def list(
        self, res: Resource, *, namespace: str | None = None, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]: ...

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> Any: ...

    async def delete(self, res: Resource, name: str, *, namespace: str | None = None) -> None: ...


def cluster_service(
    *,
    name: str,
    external_ip: str,
    replicas: int,
    namespace: str,
    ports: Sequence[tuple[str, int]] = DEFAULT_PORTS,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The labeled Service that declares a downstream cluster."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {labels.CLUSTER_LABEL: "true", labels.REPLICAS_LABEL: str(replicas)},
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "clusterIP": "None",
            "externalIPs": [external_ip],
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        },
    }


@dataclass(frozen=True)
class ClusterRow:
    name: str
    external_ip: str
    replicas: str
    problem: str


async def add(
    api: ObjectAPI,
    service: dict[str, Any],
    *,
    settings: Settings,
    overwrite: bool,
    allow_loopback: bool = False,
) -> str:
    """Create (or with ``overwrite`` replace) a cluster Service; returns "created"/"updated"."""
    name = service["metadata"]["name"]
    _, problems = validate_all([service], settings, allow_loopback=allow_loopback)
    if problems:
        raise ClusterError("; ".join(f"{p.field}: {p.message}" for p in problems))
    try:
        await api.get(SERVICES, name, namespace=settings.namespace)
        exists = True
    except NotFound:
        exists = False
    if exists and not overwrite:
        raise ClusterError(
            f"cluster {name!r} already exists; pass --overwrite to replace its settings"
        )
    await api.apply(service)
    return "updated" if exists else "created"


async def list_clusters(
    api: ObjectAPI, *, settings: Settings, allow_loopback: bool = False
) -> list[ClusterRow]:
    items, _ = await api.list(
        SERVICES, namespace=settings.namespace, label_selector=f"{labels.CLUSTER_LABEL}=true"
    )
    _, problems = validate_all(items, settings, allow_loopback=allow_loopback)
    by_name: dict[str, list[str]] = {}
    for p in problems:
        by_name.setdefault(p.source.name, []).append(f"{p.field}: {p.message}")
    rows = []
    for svc in sorted(items, key=lambda s: str(s["metadata"]["name"])):
        meta = svc.get("metadata") or {}
        spec = svc.get("spec") or {}
        ips = spec.get("externalIPs") or []
        rows.append(
            ClusterRow(
                name=str(meta.get("name")),
                external_ip=str(ips[0]) if ips else "",
                replicas=str((meta.get("labels") or {}).get(labels.REPLICAS_LABEL, "1")),
                problem="; ".join(by_name.get(str(meta.get("name")), [])),
            )
        )
    return rows


async def remove(api: ObjectAPI, name: str, *, settings: Settings) -> None:
    try:
        svc = await api.get(SERVICES, name, namespace=settings.namespace)
    except NotFound:
        raise ClusterError(f"no cluster named {name!r} in namespace {settings.namespace}") from None
    if (svc.get("metadata", {}).get("labels") or {}).get(labels.CLUSTER_LABEL) != "true":
        raise ClusterError(f"Service {name!r} is not a cluster (no {labels.CLUSTER_LABEL} label)")
    await api.delete(SERVICES, name, namespace=settings.namespace)


async def values(api: ObjectAPI, name: str, *, settings: Settings, fmt: Format) -> str:
    secret_name = labels.values_secret_name(name)
    try:
        secret = await api.get(SECRETS, secret_name, namespace=settings.namespace)
    except NotFound:
        raise ClusterError(
            f"no values yet for cluster {name!r} (Secret {secret_name} not found): "
            "is the cluster added and atlasd running?"
        ) from None
    data = (secret.get("data") or {}).get("values.yaml")
    if not data:
        raise ClusterError(f"Secret {secret_name} has no values.yaml")
    return render(fmt, base64.b64decode(data).decode(), namespace=settings.namespace)
