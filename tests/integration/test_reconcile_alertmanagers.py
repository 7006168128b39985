"""The local Alertmanagers come and go after the clusters are onboarded: every cluster's
values (``atlas.alertmanagerCount`` in ``<c>-envoy-values``) follow by the keyed path — no
full pass — and nothing else of a cluster is written (no certificate issued, its identity
and sidecar Services untouched). Against a real kube-apiserver, by the daemon's reconcile
loop (``tests/harness/reconcile.leader``: full passes only when a test asks, none here
until the values have followed)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from atlasd import labels
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.resources import SECRETS, SERVICES
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from atlasd.reconcile.applier import ReconcileResult
from tests.harness.kube import ApiServer
from tests.harness.reconcile import LeaderRun, leader
from tests.harness.wait import wait_until_async
from tests.unit.reconcile.builders import cluster_service

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
CLUSTERS = {"east": "203.0.113.1", "west": "203.0.113.2", "north": "203.0.113.3"}


def alertmanager(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": "kube-prometheus-stack-alertmanager"},
        },
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 9093}]},
    }


async def counts(kube: KubeClient, namespace: str) -> dict[str, int]:
    out = {}
    for name in CLUSTERS:
        s = await kube.get(SECRETS, labels.values_secret_name(name), namespace=namespace)
        out[name] = yaml.safe_load(secret_data(s)["values.yaml"])["atlas"]["alertmanagerCount"]
    return out


async def owned(kube: KubeClient, namespace: str) -> dict[str, str]:
    """Every object atlasd owns: kind/name -> resourceVersion."""
    out = {}
    for res in (SERVICES, SECRETS):
        items, _ = await kube.list(
            res, namespace=namespace, label_selector=f"{labels.MANAGED_BY_LABEL}=atlasd"
        )
        out |= {f"{res.kind}/{i['metadata']['name']}": i["metadata"]["resourceVersion"] for i in items}  # fmt: skip
    return out


async def follows(run: LeaderRun, kube: KubeClient, namespace: str, want: int) -> ReconcileResult:
    """Wait until every cluster's values count ``want`` Alertmanagers and the loop is idle
    (no full pass asked for); what the loop did meanwhile."""
    passes = run.loop.full_passes if run.loop is not None else 0

    async def done() -> bool:
        loop = run.loop
        return (
            loop is not None
            and loop.idle
            and set((await counts(kube, namespace)).values()) == {want}
        )

    await wait_until_async(done, timeout=60, what=f"every cluster's values count {want}")
    assert run.loop is not None and run.loop.full_passes == passes, "a full pass ran"
    results, run.results = run.results, []
    return ReconcileResult.combine(results)


async def test_every_clusters_values_follow_the_alertmanager_count(
    apiserver: ApiServer, namespace: str
) -> None:
    settings = Settings(namespace=namespace, envoy_ads_address="198.51.100.7")
    async with (
        KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube,
        leader(kube, settings, now=NOW) as run,
    ):
        for name, ip in CLUSTERS.items():
            await kube.create(cluster_service(name, ip, namespace=namespace))
        onboarded = await run.settle()
        assert onboarded.write_errors == ()
        assert await counts(kube, namespace) == dict.fromkeys(CLUSTERS, 0)
        before = await owned(kube, namespace)

        # One Alertmanager appears: each cluster's values are re-applied, nothing else.
        await kube.create(alertmanager("alertmanager-main", namespace))
        did = await follows(run, kube, namespace, 1)
        assert did.issued == ()
        assert did.writes == len(CLUSTERS), did
        after = await owned(kube, namespace)
        assert set(after) == set(before)
        moved = {k for k in after if after[k] != before[k]}
        assert moved == {f"Secret/{labels.values_secret_name(n)}" for n in CLUSTERS}

        # A second one, then both gone: the values follow each time.
        await kube.create(alertmanager("alertmanager-second", namespace))
        assert (await follows(run, kube, namespace, 2)).writes == len(CLUSTERS)
        for name in ("alertmanager-main", "alertmanager-second"):
            await kube.delete(SERVICES, name, namespace=namespace)
        await follows(run, kube, namespace, 0)
        # A full pass now finds nothing left to write.
        assert (await run.settle()).writes == 0
