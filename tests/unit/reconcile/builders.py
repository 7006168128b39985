"""Builders of cluster Service dicts shared by the reconcile unit and integration tests."""

from __future__ import annotations

from typing import Any

from atlasd import labels

DEFAULT_PORTS: tuple[tuple[str, int], ...] = (
    ("prometheus", 9090),
    ("thanos", 10901),
    ("alertmanager", 9093),
)


def cluster_service(
    name: str,
    ip: str | None = "203.0.113.10",
    *,
    namespace: str = "monitoring",
    replicas: str | None = None,
    annotations: dict[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    uid: str | None = None,
    extra_ips: list[str] | None = None,
    headless: bool = True,
) -> dict[str, Any]:
    """A Service labeled ``goatlas.io/cluster: "true"`` as an operator would write it."""
    lbls = {labels.CLUSTER_LABEL: "true"}
    if replicas is not None:
        lbls[labels.REPLICAS_LABEL] = replicas
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": lbls}
    if annotations:
        meta["annotations"] = annotations
    if uid:
        meta["uid"] = uid
    spec: dict[str, Any] = {
        "ports": ports
        if ports is not None
        else [{"name": n, "port": p, "protocol": "TCP"} for n, p in DEFAULT_PORTS],
    }
    if headless:
        # Headless: a test apiserver's service CIDR (a /24) cannot hold 1,000 ClusterIPs.
        spec["clusterIP"] = "None"
    if ip is not None:
        spec["externalIPs"] = [ip, *(extra_ips or [])]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
