"""Malformed cluster Services against a real kube-apiserver and the daemon's reconcile loop:
every one the API server accepts gets a Warning Event naming the field, nothing crashes, no
object is made for it, and the healthy clusters' objects are not written at all."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from atlasd import labels
from atlasd.fleet.keys import MANAGED_SELECTOR
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.events import post_event
from atlasd.kube.resources import EVENTS, SECRETS, SERVICES
from atlasd.model import Settings
from tests.harness.kube import ApiServer
from tests.harness.reconcile import leader
from tests.unit.reconcile.builders import cluster_service

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
HEALTHY_IP = "203.0.113.1"


def _ann(key: str, value: str) -> dict[str, str]:
    return {key: value}


def _matrix(ns: str) -> list[tuple[dict[str, Any], str]]:
    """(Service, field its Event must name); all of them pass API server validation."""
    n = 0

    def svc(**kw: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        name = kw.pop("name", f"bad{n}")
        ip = kw.pop("ip", f"198.51.100.{n}")
        return cluster_service(name, ip, namespace=ns, **kw)

    sel = f'metadata.annotations["{labels.ENVOY_SELECTORS_ANNOTATION}"]'
    rep = f'metadata.labels["{labels.REPLICAS_LABEL}"]'

    def a(key: str) -> str:
        return f'metadata.annotations["{key}"]'

    return [
        (svc(ip=None), "spec.externalIPs"),
        (svc(ip="239.1.2.3"), "spec.externalIPs[0]"),
        (svc(replicas="abc"), rep),
        (svc(replicas="0"), rep),
        (svc(replicas="1000000"), rep),
        (svc(replicas="65"), rep),
        (svc(annotations=_ann(labels.ENVOY_SELECTORS_ANNOTATION, "app")), sel),
        (svc(annotations=_ann(labels.ENVOY_SELECTORS_ANNOTATION, "app=")), sel),
        (svc(annotations=_ann(labels.ENVOY_SELECTORS_ANNOTATION, "a=b,a=c")), sel),
        (svc(annotations=_ann(labels.ENVOY_SELECTORS_ANNOTATION, "app=envoy\nx=y")), sel),
        (
            svc(annotations=_ann(labels.THANOS_SERVICE_ANNOTATION, "a.svc\nevil 60 IN A 1.2.3.4")),
            a(labels.THANOS_SERVICE_ANNOTATION),
        ),
        (
            svc(annotations=_ann(labels.THANOS_SERVICE_ANNOTATION, "a svc")),
            a(labels.THANOS_SERVICE_ANNOTATION),
        ),
        (
            svc(annotations=_ann(labels.PROMETHEUS_SERVICE_ANNOTATION, 'a"}],"x":"')),
            a(labels.PROMETHEUS_SERVICE_ANNOTATION),
        ),
        (
            svc(annotations=_ann(labels.ALERTMANAGER_SERVICE_ANNOTATION, "am.svc;drop")),
            a(labels.ALERTMANAGER_SERVICE_ANNOTATION),
        ),
        (
            svc(annotations=_ann(labels.THANOS_SERVICE_PORT_ANNOTATION, "ninety")),
            a(labels.THANOS_SERVICE_PORT_ANNOTATION),
        ),
        (
            svc(annotations=_ann(labels.DNS_GROUP_ANNOTATION, "Team A")),
            a(labels.DNS_GROUP_ANNOTATION),
        ),
        (
            svc(annotations=_ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION, "prom.svc")),
            a(labels.REPLICA_HOST_TEMPLATE_ANNOTATION),
        ),
        (
            svc(annotations=_ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION, "p-{replica}.{x}")),
            a(labels.REPLICA_HOST_TEMPLATE_ANNOTATION),
        ),
        (svc(ports=[{"port": 9090}]), "spec.ports[0].name"),
        (svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]), "spec.ports[0].protocol"),
        (svc(name="atlas"), "metadata.name"),
        (svc(name="a" * 63), "metadata.name"),
        (svc(name="b" * 48), "metadata.name"),
        (svc(name="ghost-thanos-sidecar0"), "metadata.name"),
        (svc(name="zzz-same-ip", ip=HEALTHY_IP), "spec.externalIPs[0]"),
    ]


def _rvs(items: list[dict[str, Any]]) -> dict[str, str]:
    return {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in items}


async def _owned(kube: KubeClient, ns: str) -> dict[str, str]:
    svcs, _ = await kube.list(SERVICES, namespace=ns, label_selector=MANAGED_SELECTOR)
    secrets, _ = await kube.list(SECRETS, namespace=ns, label_selector=MANAGED_SELECTOR)
    return _rvs(svcs) | _rvs(secrets)


async def test_malformed_matrix_gets_events_and_leaves_healthy_clusters_alone(
    apiserver: ApiServer, namespace: str
) -> None:
    settings = Settings(namespace=namespace)
    async with (
        KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube,
        leader(kube, settings, now=NOW, post_event=post_event) as run,
    ):
        await kube.create(cluster_service("healthy1", HEALTHY_IP, namespace=namespace))
        await kube.create(
            cluster_service("healthy2", "203.0.113.2", namespace=namespace, replicas="2")
        )
        first = await run.settle()
        assert first.problems == () and first.writes > 0
        before = await _owned(kube, namespace)

        matrix = _matrix(namespace)
        assert len(matrix) >= 20
        for svc, _field in matrix:
            await kube.create(svc)  # the API server accepts every one of them

        run.now = NOW + dt.timedelta(minutes=1)
        result = await run.settle()
        assert sorted(run.fleet.clusters) == ["healthy1", "healthy2"]
        assert result.writes == 0, "the healthy clusters' objects were rewritten"
        assert await _owned(kube, namespace) == before

        events, _ = await kube.list(EVENTS, namespace=namespace)
        by_object: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_object.setdefault(e["involvedObject"]["name"], []).append(e)
        for svc, field in matrix:
            name = svc["metadata"]["name"]
            got = by_object.get(name)
            assert got, f"no Event for {name}"
            assert all(e["type"] == "Warning" and e["reason"] == "InvalidCluster" for e in got)
            assert any(e["message"].startswith(field + ":") for e in got), (
                name,
                [e["message"] for e in got],
            )
            assert got[0]["involvedObject"]["kind"] == "Service"
            assert got[0]["involvedObject"]["uid"]
        assert set(by_object) == {s["metadata"]["name"] for s, _ in matrix}
        assert result.events == len(events)

        # The next pass reports nothing new and writes nothing.
        run.now = NOW + dt.timedelta(minutes=2)
        again = await run.settle()
        assert (again.writes, again.events) == (0, 0)
        events_after, _ = await kube.list(EVENTS, namespace=namespace)
        assert len(events_after) == len(events)

        # Fixing one onboards it; breaking a healthy one keeps its objects (protected).
        run.now = NOW + dt.timedelta(minutes=3)
        fixed = await kube.get(SERVICES, "bad3", namespace=namespace)
        fixed["metadata"]["labels"][labels.REPLICAS_LABEL] = "2"
        await kube.replace(fixed)
        broken = await kube.get(SERVICES, "healthy2", namespace=namespace)
        broken["metadata"]["annotations"] = {labels.ENVOY_SELECTORS_ANNOTATION: "oops"}
        await kube.replace(broken)
        later = await run.settle()
        assert sorted(run.fleet.clusters) == ["bad3", "healthy1"]
        assert later.deleted == 0
        owned = await _owned(kube, namespace)
        for name, rv in before.items():
            assert owned[name] == rv, f"{name} changed"
        assert {"bad3-thanos-sidecar0", "bad3-thanos-sidecar1", "bad3-envoy-values"} <= set(owned)
        assert later.events == 1
        (problem,) = [p for p in later.problems if p.source.name == "healthy2"]
        assert problem.field == f'metadata.annotations["{labels.ENVOY_SELECTORS_ANNOTATION}"]'
