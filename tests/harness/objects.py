"""Kubernetes objects the tests and benchmarks create, spelled once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

THANOS = (("thanos", 10901),)
THANOS_PROMETHEUS = (("thanos", 10901), ("prometheus", 9090))
ALL_PORTS = (*THANOS_PROMETHEUS, ("alertmanager", 9093))


def cluster_service(
    name: str,
    ip: str,
    *,
    ports: Iterable[tuple[str, int]] = THANOS,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A cluster Service as an operator writes it (label goatlas.io/cluster=true, the
    downstream Envoy's external IP, the sidecar Service's ports)."""
    meta: dict[str, Any] = {
        "name": name,
        "labels": {"goatlas.io/cluster": "true", **(labels or {})},
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "externalIPs": [ip],
            "ports": [{"name": n, "port": p} for n, p in ports],
        },
    }
