"""Clusters come and go live: a new cluster reaches the observability Envoy without a
restart; a removed one loses its routes and clusters there, and its node gets nothing."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2  # type: ignore[import-untyped]

from atlasd import model
from atlasd.xds.snapshot import CLUSTER, Resource, Snapshot
from tests.harness.wait import wait_until_async
from tests.unit.xds import helpers
from tests.unit.xds.world import World, xds_world

pytestmark = pytest.mark.integration


async def _dump(w: World, name: str) -> str:
    envoy = w.envoys[name]
    return str(await trio.to_thread.run_sync(envoy.config_dump))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_add_then_remove_cluster(envoy_factory: Any, delta: bool) -> None:
    async with xds_world(envoy_factory, delta=delta, clusters=("east",)) as w:
        await w.start_envoy("atlas")
        await w.start_envoy("east")
        for n in ("atlas", "east"):
            await w.wait_acked(n)

        # Add west: the running observability Envoy gets its routes and clusters.
        w.add_cluster(helpers.cluster("west"))
        assert w.publish() == {"atlas", "west"}  # east's snapshot is unchanged
        await wait_until_async(
            lambda: _contains(w, "atlas", ("/prom/west/", "west-thanos", "west-prom")),
            timeout=20,
            what="west in the observability Envoy",
        )
        await w.start_envoy("west")
        await w.wait_acked("west")
        await w.wait_acked("atlas")

        # Remove east: routes and clusters go; east's stream is closed and gets nothing.
        pushes_before = _pushes(w)
        w.remove_cluster("east")
        assert w.publish() == {"atlas", "east"}
        assert w.cache.get("east") is None
        await wait_until_async(
            lambda: _lacks(w, "atlas", ("/prom/east/", "east-thanos", "east-prom")),
            timeout=20,
            what="east gone from the observability Envoy",
        )
        await w.wait_acked("atlas")
        await wait_until_async(
            lambda: all(not s.acked for s in w.cache.status() if s.node == "east"),
            timeout=20,
            what="east's old stream closed",
        )
        # The reconnected east Envoy (if any) holds a stream that is sent nothing.
        east_streams = [s for s in w.cache.status() if s.node == "east"]
        assert all(not s.acked for s in east_streams)
        # Only atlas pushes happened since (east got none, west unchanged).
        assert _pushes(w) > pushes_before


async def _contains(w: World, name: str, needles: tuple[str, ...]) -> bool:
    text = await _dump(w, name)
    return all(n in text for n in needles)


async def _lacks(w: World, name: str, needles: tuple[str, ...]) -> bool:
    text = await _dump(w, name)
    return not any(n in text for n in needles)


def _pushes(w: World) -> float:
    total = 0.0
    for metric in w.registry.collect():
        if metric.name == "atlasd_xds_pushes":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoys_reconnect_and_get_full_state(envoy_factory: Any, delta: bool) -> None:
    """atlasd restarts (new streams, no memory of old ones): the Envoys keep serving their
    config meanwhile, reconnect, and converge on the current state including a change."""
    async with xds_world(envoy_factory, delta=delta, clusters=("east",)) as w:
        await w.start_envoy("atlas")
        await w.start_envoy("east")
        for n in ("atlas", "east"):
            await w.wait_acked(n)
        before = {s.stream_id for s in w.cache.status()}
        await w.restart_server()
        w.add_cluster(helpers.cluster("west"))
        w.publish()
        for n in ("atlas", "east"):
            await w.wait_acked(n)
        assert {s.stream_id for s in w.cache.status()}.isdisjoint(before)
        await wait_until_async(
            lambda: _contains(w, "atlas", ("/prom/west/", "west-thanos")),
            timeout=20,
            what="the change after reconnecting",
        )


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_downstream_stream_ends_at_its_age_and_the_envoy_comes_back(
    envoy_factory: Any, delta: bool
) -> None:
    """--ads-max-stream-age: a real downstream Envoy's stream ends at its age; the Envoy
    opens a new one on its own and ACKs what changed meanwhile; node atlas's stream (the
    whole fleet on every new stream) is never ended for its age."""
    async with xds_world(envoy_factory, delta=delta, clusters=("east",), max_stream_age=1.0) as w:
        await w.start_envoy("atlas")
        await w.start_envoy("east")
        for n in ("atlas", "east"):
            await w.wait_acked(n)

        def stream_of(node: str) -> int | None:
            return next((s.stream_id for s in w.cache.status() if s.node == node), None)

        atlas, east = stream_of("atlas"), stream_of("east")
        seen = {east}

        def aged() -> float:
            return w.registry.get_sample_value("atlasd_xds_aged_streams_total") or 0.0

        # Two of east's streams ended at their age (at least 0.9 s each): longer than the
        # 1.1 s atlas's would have lived had it aged too.
        def two_new_streams() -> bool:
            seen.add(stream_of("east"))
            return len(seen - {None}) >= 3 and aged() >= 2

        await wait_until_async(two_new_streams, timeout=30, what="east's streams ended at age")
        assert stream_of("atlas") == atlas
        # A change east's snapshot follows (the alert relay), ACKed on its newest stream.
        w.alertmanagers.append(model.LocalAlertmanager("am-a", "monitoring", 9093))
        w.publish()
        for n in ("atlas", "east"):
            await w.wait_acked(n)
        stats = await trio.to_thread.run_sync(w.envoys["east"].stats, "control_plane.")
        assert stats["control_plane.connected_state"] == 1


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_no_cluster_yet_then_the_first(envoy_factory: Any, delta: bool) -> None:
    """A fresh install: the observability Envoy's scoped routes have no scope at all (a
    static list of scopes may not be empty; SRDS may), it ACKs, then takes the first cluster.
    (Found by the property tests' long profile, whose static form of an empty fleet failed.)"""
    async with xds_world(envoy_factory, delta=delta, clusters=()) as w:
        await w.start_envoy("atlas")
        await w.wait_acked("atlas")
        await w.wait_envoy_ready("atlas")
        assert not any(s.last_nack for s in w.cache.status() if s.node == "atlas")
        w.add_cluster(helpers.cluster("east"))
        assert "atlas" in w.publish()
        await wait_until_async(
            lambda: _contains(w, "atlas", ("/prom/east/", "east-thanos", "east-prom")),
            timeout=20,
            what="the first cluster in the observability Envoy",
        )
        await w.wait_acked("atlas")
        assert not any(s.last_nack for s in w.cache.status() if s.node == "atlas")


def _warming(dump: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for section in dump.get("configs", []):
        for c in section.get("dynamic_warming_clusters", []):
            names.append(c["cluster"]["name"])
    return names


def _connect_timeout(dump: dict[str, Any], name: str) -> str | None:
    for section in dump.get("configs", []):
        for c in section.get("dynamic_active_clusters", []):
            if c["cluster"]["name"] == name:
                return str(c["cluster"].get("connect_timeout"))
    return None


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_cluster_changed_by_cds_alone_is_warm_at_once(
    envoy_factory: Any, delta: bool
) -> None:
    """A CDS change of a cluster whose assignment stays the same makes a new cluster
    instance in the Envoy that waits for that assignment; atlasd sends it when the Envoy
    ACKs the CDS response, so the change takes effect now, not after Envoy's initial fetch
    timeout (15 s: go-control-plane#1035) with no endpoints or cached ones."""
    async with xds_world(envoy_factory, delta=delta, clusters=("east",)) as w:
        await w.start_envoy("atlas")
        await w.wait_acked("atlas")
        await w.wait_envoy_ready("atlas")
        snap = w.cache.get("atlas")
        assert snap is not None
        old = snap.resources[CLUSTER]["east-prom"]
        cl = cluster_pb2.Cluster.FromString(old.body)
        cl.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=7))
        changed = Resource.of(CLUSTER, old.name, cl.SerializeToString(), old.refs)
        resources = [r for rs in snap.resources.values() for r in rs.values() if r is not old]
        started = time.monotonic()
        assert w.cache.set_snapshot("atlas", Snapshot.create("atlas", [*resources, changed]))

        def applied() -> bool:
            dump = w.envoys["atlas"].config_dump()
            return _connect_timeout(dump, "east-prom") == "7s" and not _warming(dump)

        await wait_until_async(
            lambda: trio.to_thread.run_sync(applied),
            timeout=10,  # under Envoy's 15 s initial fetch timeout
            what="east-prom's new instance warm (its assignment received)",
        )
        assert time.monotonic() - started < 10
