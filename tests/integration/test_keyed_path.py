"""One change costs one cluster: the keyed path against a real kube-apiserver and Envoy.

- 200 clusters onboarded; one cluster's external IP changes: atlasd makes no LIST, writes
  nothing (nothing it writes depends on the IP), every object's resourceVersion is
  unchanged, and the observability Envoy gets exactly one push (CDS) with the new address;
  the follower replica follows key by key, making no request at all.
- A Secret atlasd does not own changes: no API request, no push, no reconcile.
- The leader hands over: the follower takes over, both Envoys' configuration is kept, and
  the new leader reconciles a change.
- Cache lag: the watch of Secrets is held back after the leader's writes; the key changes
  again meanwhile and is not acted on (its certificates are not issued twice); once the
  watch catches up, the key is in sync and nothing more is written.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import trio
import yaml

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import roles
from atlasd.fleet.run import FleetRunner
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.resources import SECRETS, SERVICES
from atlasd.model import Settings
from atlasd.reconcile.applier import Reconciler, ReconcileResult
from atlasd.reconcile.loop import ReconcileLoop
from atlasd.watch.sources import run_sources
from atlasd.watch.watched import WatchedSet
from tests.harness import objects
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until, wait_until_async
from tests.integration.daemon_helpers import Atlasd

pytestmark = pytest.mark.integration

N = 200


def cluster_service(i: int, ip: str | None = None) -> dict[str, Any]:
    ip = ip or f"198.18.{i // 250}.{i % 250 + 1}"
    return objects.cluster_service(f"k{i:03d}", ip, ports=objects.THANOS_PROMETHEUS)


def owned_versions(api: ApiServer, ns: str) -> dict[str, str]:
    out = {}
    with api.admin() as c:
        for plural in ("services", "secrets"):
            items = c.get(
                f"/api/v1/namespaces/{ns}/{plural}",
                params={"labelSelector": "app.kubernetes.io/managed-by=atlasd"},
            ).json()["items"]
            out.update(
                {
                    f"{plural}/{i['metadata']['name']}": i["metadata"]["resourceVersion"]
                    for i in items
                }
            )
    return out


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx2.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("atlasd_") and " " in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def requests(sample: dict[str, float]) -> dict[str, float]:
    """API requests by verb. Left out: watch (re)connects and what the leader does on a
    clock whatever changes — Lease renewals and the look at the original Atlas's lock
    (a GET of ConfigMap and Lease ``atlas`` every 15 s, ``atlasd.kube.legacy_lock``)."""
    out: dict[str, float] = {}
    for key, n in sample.items():
        if not key.startswith("atlasd_kube_requests_total{") or 'resource="leases"' in key:
            continue
        verb = key.split('verb="', 1)[1].split('"', 1)[0]
        if verb == "watch" or (verb == "get" and 'resource="configmaps"' in key):
            continue
        out[verb] = out.get(verb, 0.0) + n
    return out


def total(sample: dict[str, float], prefix: str) -> float:
    return sum(n for k, n in sample.items() if k.startswith(prefix))


def _acked_all(atlasd: Atlasd) -> bool:
    doc = httpx2.get(f"{atlasd.url}/status/envoys", timeout=10).json()
    want = doc["snapshots"].get("atlas")
    return bool(want) and any(
        e["node"] == "atlas" and all(e["acked"].get(t) == v for t, v in want.items())
        for e in doc["envoys"]
    )


@pytest.fixture(scope="module")
def fleet(
    apiserver: ApiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """200 clusters served by two replicas, an observability Envoy on the follower."""
    ns = "keyed"
    apiserver.create_namespace(ns)
    tmp = tmp_path_factory.mktemp("keyed")
    with apiserver.admin() as c:
        for i in range(N):
            c.post(f"/api/v1/namespaces/{ns}/services", json=cluster_service(i)).raise_for_status()
    kube = (f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={ns}")
    a = Atlasd(tmp / "a", *kube, "--identity=keyed-a").start(timeout=120)
    wait_until(lambda: a.status()["leader"], timeout=60, what="a leads")
    b = Atlasd(tmp / "b", *kube, "--identity=keyed-b").start(timeout=120)
    envoy = None
    try:
        for r in (a, b):
            wait_until(
                lambda r=r: len(r.status().get("clusters") or []) == N,
                timeout=180,
                what="every cluster served",
                interval=0.5,
            )
        with apiserver.admin() as c:
            values = c.get(f"/api/v1/namespaces/{ns}/secrets/atlas-envoy-values").json()
        boot = yaml.safe_load(
            yaml.safe_load(base64.b64decode(values["data"]["values.yaml"]))["files"]["envoy.yaml"]
        )
        # The Envoy talks to the follower (b): xDS is served by every replica.
        boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][
            0
        ]["endpoint"]["address"]["socket_address"]["port_value"] = b.ads_port
        boot["dynamic_resources"]["ads_config"]["api_type"] = "DELTA_GRPC"
        envoy = Envoy(boot, "atlas", workdir=tmp)
        envoy.start()
        wait_until(lambda: _acked_all(b), timeout=120, what="the Envoy ACKs", interval=0.2)
        yield {"ns": ns, "leader": a, "follower": b, "envoy": envoy}
    finally:
        if envoy is not None:
            envoy.stop()
        a.proc.stop()
        b.proc.stop()


def _patch_ip(api: ApiServer, ns: str, name: str, ip: str) -> None:
    with api.admin() as c:
        c.patch(
            f"/api/v1/namespaces/{ns}/services/{name}",
            content=json.dumps({"spec": {"externalIPs": [ip]}}),
            headers={"content-type": "application/merge-patch+json"},
        ).raise_for_status()


def _dials(envoy: Envoy, name: str, ip: str) -> bool:
    return envoy.endpoint_addresses(f"{name}-prom") == {ip}


def test_an_ip_change_costs_one_cluster(apiserver: ApiServer, fleet: dict[str, Any]) -> None:
    ns, leader, follower, envoy = fleet["ns"], fleet["leader"], fleet["follower"], fleet["envoy"]
    time.sleep(3)  # onboarding's echoes settle (an observation baseline, not a wait for a state)
    before_versions = owned_versions(apiserver, ns)
    lead0, follow0 = scrape(leader.url), scrape(follower.url)
    _patch_ip(apiserver, ns, "k042", "198.51.100.42")
    wait_until(
        lambda: _dials(envoy, "k042", "198.51.100.42"), timeout=30, what="the Envoy dials it"
    )
    wait_until(lambda: _acked_all(follower), timeout=30, what="the Envoy ACKs")
    time.sleep(2)  # the window in which nothing else may happen
    lead1, follow1 = scrape(leader.url), scrape(follower.url)
    assert requests(lead1) == requests(lead0), "the leader made API requests for an IP change"
    assert requests(follow1) == requests(follow0), "the follower made API requests"
    assert owned_versions(apiserver, ns) == before_versions, "an IP change rewrote objects"
    pushed = {
        t: total(follow1, f'atlasd_xds_pushes_total{{type="{t}"}}')
        - total(follow0, f'atlasd_xds_pushes_total{{type="{t}"}}')
        for t in ("cds", "eds", "lds", "rds", "srds", "sds")
    }
    assert pushed == {"cds": 0, "eds": 1, "lds": 0, "rds": 0, "srds": 0, "sds": 0}
    # The leader knew the key was in sync at once: one keyed reconcile, no plan, no write.
    assert total(lead1, "atlasd_reconcile_writes_total") == total(
        lead0, "atlasd_reconcile_writes_total"
    )


def test_an_unrelated_secret_wakes_nothing(apiserver: ApiServer, fleet: dict[str, Any]) -> None:
    ns, leader, follower = fleet["ns"], fleet["leader"], fleet["follower"]
    lead0, follow0 = scrape(leader.url), scrape(follower.url)
    with apiserver.admin() as c:
        path = f"/api/v1/namespaces/{ns}/secrets"
        c.post(
            path, json={"metadata": {"name": "not-ours"}, "stringData": {"k": "1"}}
        ).raise_for_status()
        c.patch(
            f"{path}/not-ours",
            content=json.dumps({"stringData": {"k": "2"}}),
            headers={"content-type": "application/merge-patch+json"},
        ).raise_for_status()
        c.delete(f"{path}/not-ours").raise_for_status()
    time.sleep(3)  # the window in which nothing may happen
    lead1, follow1 = scrape(leader.url), scrape(follower.url)
    for before, after in ((lead0, lead1), (follow0, follow1)):
        assert requests(after) == requests(before)
        assert total(after, "atlasd_xds_pushes_total") == total(before, "atlasd_xds_pushes_total")
        assert total(after, "atlasd_fleet_publish_duration_seconds_count") == total(
            before, "atlasd_fleet_publish_duration_seconds_count"
        )
        assert total(after, 'atlasd_reconcile_duration_seconds_count{kind="key"}') == total(
            before, 'atlasd_reconcile_duration_seconds_count{kind="key"}'
        )


def test_handover_keeps_the_envoy_served(apiserver: ApiServer, fleet: dict[str, Any]) -> None:
    ns, leader, follower, envoy = fleet["ns"], fleet["leader"], fleet["follower"], fleet["envoy"]
    leader.proc.kill()
    wait_until(lambda: follower.status()["leader"], timeout=45, what="the follower takes over")
    assert _acked_all(follower) and _dials(envoy, "k042", "198.51.100.42")
    with apiserver.admin() as c:
        c.post(f"/api/v1/namespaces/{ns}/services", json=cluster_service(N)).raise_for_status()
    wait_until(
        lambda: _dials(envoy, f"k{N:03d}", f"198.18.{N // 250}.{N % 250 + 1}"),
        timeout=60,
        what="the new leader onboards a cluster the Envoy then dials",
    )


# -- cache lag ---------------------------------------------------------------------------------


class GatedSink(FleetRunner):
    """Delivers watch changes, except that while ``held`` those of one role wait."""

    def __init__(self, *args: Any, held_role: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.held_role = held_role
        self.held = False
        self.backlog: list[tuple[WatchedSet, str, dict[str, object] | None]] = []

    def changed(self, role: WatchedSet, name: str, obj: dict[str, object] | None) -> None:
        if self.held and role.name == self.held_role:
            self.backlog.append((role, name, obj))
            return
        super().changed(role, name, obj)

    def release(self) -> None:
        self.held = False
        backlog, self.backlog = self.backlog, []
        for item in backlog:
            super().changed(*item)


async def test_a_lagging_cache_never_reissues(apiserver: ApiServer, namespace: str) -> None:
    settings = Settings(namespace=namespace)
    feed = FleetFeed()
    reconciler = Reconciler(settings=settings)
    sink = GatedSink(settings, feed=feed, held_role="owned-secrets")
    results: list[ReconcileResult] = []
    async with (
        KubeClient(load_config(str(apiserver.admin_kubeconfig), None)) as kube,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(
            lambda task_status: run_sources(
                kube, roles(settings), namespace=namespace, sink=sink, task_status=task_status
            )
        )
        await nursery.start(sink.run)
        loop = ReconcileLoop(
            api=kube,
            feed=feed,
            reconciler=reconciler,
            resync_seconds=3600,
            workers=4,
            on_result=lambda result, _seconds: results.append(result),
        )
        await nursery.start(loop.run)

        def served(name: str) -> bool:
            v = feed.latest
            return v is not None and name in v.model.clusters

        await kube.create(
            {
                **cluster_service(1),
                "metadata": {**cluster_service(1)["metadata"], "namespace": namespace},
            }
        )
        await wait_until_async(lambda: served("k001"), timeout=30, what="k001 served")
        # Hold back the Secrets watch; a new cluster is written by the leader...
        sink.held = True
        svc = cluster_service(2)
        svc["metadata"]["namespace"] = namespace
        await kube.create(svc)

        def issued(name: str) -> list[str]:
            return [i for r in results if r.key == name for i in r.issued]

        await wait_until_async(lambda: issued("k002"), timeout=30, what="k002 issued")
        first = await kube.get(
            SECRETS,
            "k002-atlas-identity",
            namespace=namespace,
        )
        # ... and changes again before the cache has seen those writes.
        stored = await kube.get(
            SERVICES,
            "k002",
            namespace=namespace,
        )
        stored["metadata"].setdefault("annotations", {})["touched"] = "1"
        await kube.replace(stored)
        await wait_until_async(
            lambda: any(r.key == "k002" and r.waiting_until is not None for r in results),
            timeout=30,
            what="the key waits for its writes to be seen",
        )
        assert sorted(issued("k002")) == ["k002/client", "k002/server"]
        assert not served("k002")
        # The watch catches up: the key is in sync, served, and nothing is issued again.
        sink.release()
        await wait_until_async(lambda: served("k002"), timeout=30, what="k002 served")
        await trio.sleep(1)  # an observation window: nothing more may be written
        assert sorted(issued("k002")) == ["k002/client", "k002/server"]
        again = await kube.get(
            SECRETS,
            "k002-atlas-identity",
            namespace=namespace,
        )
        assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        nursery.cancel_scope.cancel()
