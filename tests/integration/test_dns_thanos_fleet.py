"""The outcome through the production chain, at fleet scale on one machine:

    endpoints writer -> all.yaml -> Thanos Query (--endpoint.sd-config-file)
        -> <cluster>-thanos-sidecar0.monitoring.svc.cluster.local:<Envoy port>
        -> observability Envoy (configured by atlasd's xDS server: route by authority,
           mTLS to <external IP>:11901, upstream SAN = the cluster)
        -> the downstream-fleet simulator (one process, one address and server
           certificate per cluster, Thanos Info answering cluster=<name>)

Thanos Query lists every cluster as a healthy store with its external label, and drops
one that leaves the fleet. Same DNS stand-in and privileges as ``test_dns_thanos``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from atlasd.dns.endpoints import ALL_KEY
from atlasd.hub import StatusHub
from atlasd.model import DownstreamCluster, Fleet, ServicePort
from atlasd.query.observer import run_query_observer
from tests.harness.procs import Proc
from tests.harness.prom import WebProc
from tests.harness.wait import wait_until, wait_until_async
from tests.integration.test_dns_thanos import Rig
from tests.integration.test_dns_thanos_endpoints import (
    endpoints_writer,
    start_dns_and_query_from_file,
)
from tests.unit.xds import helpers as xds_helpers
from tests.unit.xds.world import xds_world

pytestmark = pytest.mark.integration

N = 24


async def healthy_stores(url: str) -> dict[str, str]:
    """Store address -> its cluster label, for the stores Thanos Query has no error for."""
    async with httpx2.AsyncClient(timeout=3) as client:
        body = (await client.get(f"{url}/api/v1/stores")).json()
    out: dict[str, str] = {}
    for group in (body.get("data") or {}).values():
        for store in group:
            if store.get("lastError"):
                continue
            labels = [ls.get("cluster") for ls in store.get("labelSets") or []]
            out[store["name"]] = ",".join(str(x) for x in labels)
    return out


def start_simulator(
    tmp_path: Path, request: pytest.FixtureRequest, world: Any, clusters: list[DownstreamCluster]
) -> None:
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "ca.pem").write_bytes(world.pki.trust_bundle)
    entries = []
    for c in clusters:
        ident = world.pki.identity(c.name)
        (sim / f"{c.name}.pem").write_bytes(ident.server.cert_pem + world.pki.pki.chain)
        (sim / f"{c.name}-key.pem").write_bytes(ident.server.key_pem)
        entries.append(
            {
                "name": c.name,
                "address": c.external_ip,
                "cert": str(sim / f"{c.name}.pem"),
                "key": str(sim / f"{c.name}-key.pem"),
            }
        )
    spec = sim / "spec.json"
    port = world.plan.downstream_default.thanos
    spec.write_text(json.dumps({"ca": str(sim / "ca.pem"), "port": port, "clusters": entries}))
    proc = Proc(
        "fleet-sim",
        [sys.executable, "-m", "tests.harness.fleet_sim", str(spec), "--duration", "300"],
        log_dir=sim,
    )
    request.addfinalizer(proc.stop)
    proc.start()
    ready = Path(f"{spec}.ready")
    wait_until(lambda: proc.check_running() or ready.exists(), timeout=60, what="sim ready")


async def test_thanos_query_sees_a_simulated_fleet_through_envoy_from_the_endpoints_file(
    tmp_path: Path,
    prometheus_factory: Callable[[str], WebProc],
    envoy_factory: Any,
    request: pytest.FixtureRequest,
) -> None:
    rig = Rig(tmp_path, prometheus_factory, request)
    block = random.randint(60, 250)
    async with xds_world(envoy_factory, clusters=()) as world:
        obs_port = world.plan.observability.thanos
        clusters = [
            DownstreamCluster(
                name=f"sim{i:02d}",
                external_ip=f"127.{block}.{i // 200}.{i % 200 + 1}",
                ports=(ServicePort("thanos", obs_port),),
            )
            for i in range(N)
        ]
        identities = [(c.name, xds_helpers.identity(world.ca, c.name)) for c in clusters]
        world.pki = world.pki.with_identities((*world.pki.identities, *identities))
        world.clusters.extend(clusters)
        world.publish()
        start_simulator(tmp_path, request, world, clusters)
        await world.start_envoy("atlas")
        await world.wait_acked("atlas")
        await world.wait_envoy_ready("atlas")

        directory = tmp_path / "endpoints"
        fleet = Fleet.of(world.settings, clusters)
        async with endpoints_writer(directory) as push:
            await push(fleet)
            start_dns_and_query_from_file(rig, directory / ALL_KEY)
            want = {
                f"{c.name}-thanos-sidecar0.monitoring.svc.cluster.local:{obs_port}": c.name
                for c in clusters
            }

            async def sees(expected: dict[str, str]) -> bool:
                return await healthy_stores(rig.url) == expected

            await wait_until_async(
                lambda: sees(want), timeout=120, what=f"Thanos Query sees all {N} clusters"
            )

            # atlasd's observer of Thanos Query, reading the real Query: every simulated
            # cluster seen with its label, and a served cluster Query has no store for
            # reported as not seen.
            ghost = DownstreamCluster(
                name="ghost", external_ip="192.0.2.99", ports=(ServicePort("thanos", obs_port),)
            )
            served = Fleet.of(world.settings, [*clusters, ghost])
            hub = StatusHub()
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: run_query_observer(
                        url=rig.url, interval=0.5, fleet=lambda: served, hub=hub,
                        task_status=task_status,
                    )
                )  # fmt: skip

                def observed() -> dict[str, int] | None:
                    doc = hub.snapshot().get("query")
                    return doc["counts"] if doc and doc["counts"].get("seen") == N else None

                counts = await wait_until_async(observed, timeout=30, what="the observer")
                nursery.cancel_scope.cancel()
            assert counts == {"seen": N, "unseen": 1, "unknown": 0, "duplicate": 0}
            doc = hub.snapshot()["query"]
            assert doc["up"] and doc["clusters"]["ghost"]["error"] == "no store in Thanos Query"
            assert doc["clusters"]["sim01"]["labels"] == [{"cluster": "sim01"}]

            # One cluster leaves: it leaves the file, and Thanos Query's stores.
            gone = clusters[0]
            await push(Fleet.of(world.settings, clusters[1:]))
            del want[f"{gone.name}-thanos-sidecar0.monitoring.svc.cluster.local:{obs_port}"]
            await wait_until_async(
                lambda: sees(want), timeout=60, what=f"Thanos Query drops {gone.name}"
            )
