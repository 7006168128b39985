"""A deliberately invalid resource is NACKed: visible in status and metrics, not re-sent
in a loop, and the Envoy keeps serving its last good configuration."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
import trio
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2

from atlasd.xds.snapshot import CLUSTER, Resource, Snapshot
from tests.harness.wait import wait_until_async
from tests.unit.xds.world import World, xds_world

pytestmark = pytest.mark.integration


def _counter(w: World, name: str, **labels: str) -> float:
    total = 0.0
    for metric in w.registry.collect():
        if metric.name == name:
            for s in metric.samples:
                if s.name.endswith("_total") and all(
                    s.labels.get(k) == v for k, v in labels.items()
                ):
                    total += s.value
    return total


def _bad_cluster() -> Resource:
    # connect_timeout must be > 0 (protoc-gen-validate rule): Envoy rejects it.
    bad = cluster_pb2.Cluster(
        name="bad",
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=-1),
    )
    return Resource.of(CLUSTER, "bad", bad.SerializeToString())


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_invalid_resource_is_nacked_and_parked(envoy_factory: Any, delta: bool) -> None:
    async with xds_world(envoy_factory, delta=delta, clusters=("east",)) as w:
        await w.start_envoy("atlas")
        await w.wait_acked("atlas")
        await w.wait_envoy_ready("atlas")
        good = w.cache.get("atlas")
        assert good is not None
        good_cds = good.version(CLUSTER)

        resources = [r for rs in good.resources.values() for r in rs.values()]
        w.cache.set_snapshot("atlas", Snapshot.create("atlas", [*resources, _bad_cluster()]))

        def nacked() -> bool:
            return any(s.node == "atlas" and s.last_nack is not None for s in w.cache.status())

        await wait_until_async(nacked, timeout=20, what="the NACK in status")
        st = next(s for s in w.cache.status() if s.node == "atlas")
        assert st.last_nack is not None
        assert st.last_nack.type_url == CLUSTER
        assert "duration" in st.last_nack.message
        assert st.acked_version(CLUSTER) == good_cds  # still on the last good version
        assert _counter(w, "atlasd_xds_nacks", node="atlas", type="cds") == 1

        # Not re-sent: over a window, no further CDS push and no further NACK.
        pushes = _counter(w, "atlasd_xds_pushes", type="cds")
        with trio.move_on_after(2):
            while True:
                assert _counter(w, "atlasd_xds_pushes", type="cds") == pushes
                assert _counter(w, "atlasd_xds_nacks", node="atlas", type="cds") == 1
                await trio.sleep(0.1)

        # The Envoy still serves its last good configuration.
        envoy = w.envoys["atlas"]
        dump = str(await trio.to_thread.run_sync(envoy.config_dump))
        assert "east-prom" in dump
        url = f"http://127.0.0.1:{w.plan.observability.prometheus}/prom/nowhere/"
        r = await trio.to_thread.run_sync(lambda: httpx2.get(url, timeout=5))
        assert r.status_code == 404 and r.headers.get("server") == "envoy"

        # The next good snapshot is accepted.
        w.cache.set_snapshot("atlas", good)
        await w.wait_acked("atlas")
