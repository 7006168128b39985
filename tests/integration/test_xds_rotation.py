"""CA rotation while a loop of requests runs through atlas -> east over mTLS, no request
failing: by hand (trust both CAs, re-issue every leaf, drop the old CA) and as atlasd
rotates (a linked new CA), restarting Envoys from their pre-rotation values."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from typing import Any

import httpx2
import pytest
import trio
import yaml

from atlasd import labels, model
from atlasd.reconcile.desired import downstream_values, observability_values
from atlasd.reconcile.pki import PKIPlan, RandomKeys, plan_pki
from tests.harness.envoy import Envoy
from tests.harness.wait import wait_until_async
from tests.unit.reconcile.pkitools import plan_secrets, with_annotation
from tests.unit.xds import helpers
from tests.unit.xds.world import World, start_envoy_here, xds_world

pytestmark = pytest.mark.integration


async def _all_acked(w: World) -> None:
    for node in ("atlas", "east"):
        await w.wait_acked(node)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_ca_rotation_under_load(
    envoy_factory: Any, prometheus_factory: Any, delta: bool
) -> None:
    prom = await trio.to_thread.run_sync(prometheus_factory, "global:\n  scrape_interval: 15s\n")
    async with xds_world(
        envoy_factory,
        delta=delta,
        clusters=("east",),
        cluster_factory=lambda n: helpers.cluster(n, prom_port=prom.port),
        # Recycle upstream connections every second, so each phase does fresh handshakes.
        upstream_connection_seconds=1,
    ) as w:
        await w.start_envoy("atlas")
        await w.start_envoy("east")
        await _all_acked(w)
        url = (
            f"http://127.0.0.1:{w.plan.observability.prometheus}/prom/east/api/v1/status/buildinfo"
        )
        await wait_until_async(
            lambda: trio.to_thread.run_sync(lambda: httpx2.get(url, timeout=5).status_code == 200),
            timeout=20,
            what="first request through",
        )

        stop = threading.Event()
        results: list[int | str] = []

        def loop() -> None:
            with httpx2.Client(timeout=5) as client:
                while not stop.is_set():
                    try:
                        results.append(client.get(url).status_code)
                    except httpx2.HTTPError as exc:
                        results.append(repr(exc))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            old_ca = w.ca
            new_ca = helpers.make_ca("atlas-test-ca-2")
            # 1. Trust both (new first), leaves unchanged.
            w.pki = dataclasses.replace(
                w.pki,
                pki=dataclasses.replace(w.pki.pki, trust_bundle=new_ca.bundle + old_ca.bundle),
            )
            assert w.publish() == {"atlas", "east"}
            await _all_acked(w)
            # 2. Re-issue every leaf under the new CA.
            w.pki = w.pki.with_identities(
                tuple((n, helpers.identity(new_ca, n)) for n, _ in w.pki.identities)
            )
            w.ca = new_ca
            assert w.publish() == {"atlas", "east"}
            await _all_acked(w)
            # 3. Drop the old CA.
            w.pki = dataclasses.replace(
                w.pki, pki=dataclasses.replace(w.pki.pki, trust_bundle=new_ca.bundle)
            )
            assert w.publish() == {"atlas", "east"}
            await _all_acked(w)
            # Keep the loop running past a connection recycle under the final state.
            hs = f"listener.127.0.0.1_{w.plan.ports_for('east').prometheus}.ssl.handshake"
            east_envoy = w.envoys["east"]
            start = (await trio.to_thread.run_sync(east_envoy.stats, hs))[hs]
            await wait_until_async(
                lambda: trio.to_thread.run_sync(lambda: east_envoy.stats(hs)[hs] >= start + 2),
                timeout=20,
                what="fresh handshakes after the rotation",
            )
        finally:
            stop.set()
            await trio.to_thread.run_sync(thread.join)
        east = w.envoys["east"]
        prom_port = w.plan.ports_for("east").prometheus
        stats = await trio.to_thread.run_sync(east.stats, f"listener.127.0.0.1_{prom_port}.ssl.")
        assert stats[f"listener.127.0.0.1_{prom_port}.ssl.handshake"] >= 3  # new certs in use
        failures = [r for r in results if r != 200]
        assert len(results) > 20
        assert failures == [], f"{len(failures)} of {len(results)} failed: {failures[:5]}"


def _values_bootstrap(w: World, plan: PKIPlan, node: str) -> dict[str, Any]:
    """The bootstrap in the values atlasd writes for ``node`` under ``plan``."""
    if node == model.OBSERVABILITY_NODE:
        values = observability_values(w.settings, identity=plan.identities[node], pki=plan.pki)
    else:
        (cluster,) = [c for c in w.clusters if c.name == node]
        values = downstream_values(
            cluster,
            identity=plan.identities[node],
            ca_bundle=plan.pki.trust_bundle,
            chain=plan.pki.chain,
            settings=w.settings,
            alertmanager_count=0,
        )
    boot: dict[str, Any] = yaml.safe_load(values["files"]["envoy.yaml"])
    return boot


def _serve_plan(w: World, plan: PKIPlan) -> set[str]:
    w.pki = helpers.Trust(plan.pki, tuple(plan.identities.items()))
    assert plan.ads_server is not None
    w.ads_cert = plan.ads_server
    return w.publish()


async def _start(w: World, boot: dict[str, Any], name: str) -> Envoy:
    envoy: Envoy = start_envoy_here(w.envoy_factory, boot, name)
    w.envoys[name] = envoy
    return envoy


async def _restart(w: World, node: str, boot: dict[str, Any]) -> None:
    """Stop ``node``'s Envoy, wait until atlasd has seen its stream go, start it again from
    ``boot``."""
    await trio.to_thread.run_sync(w.envoys[node].stop)
    await wait_until_async(
        lambda: not any(s.node == node for s in w.cache.status()),
        timeout=30,
        what=f"{node}'s stream closed",
    )
    await _start(w, boot, f"{node}-restarted")


async def test_envoys_restarted_from_pre_rotation_values_connect_and_serve(
    envoy_factory: Any, prometheus_factory: Any
) -> None:
    """atlasd's own rotation (``plan_pki``): the new CA is linked to the old one, so Envoys
    restarted from values rendered before the rotation — whose bootstraps trust only the
    old CA — still connect, get their configuration and serve, while requests keep flowing
    through the chain. Without the link they could not (the negative control at the end)."""
    prom = await trio.to_thread.run_sync(prometheus_factory, "global:\n  scrape_interval: 15s\n")
    async with xds_world(
        envoy_factory,
        clusters=("east", "west"),
        cluster_factory=lambda n: helpers.cluster(n, prom_port=prom.port),
        upstream_connection_seconds=1,
    ) as w:
        plan = plan_pki(
            secrets={}, clusters=w.clusters, settings=w.settings, now=_now(), keys=RandomKeys()
        )
        _serve_plan(w, plan)
        before = {n: _values_bootstrap(w, plan, n) for n in ("atlas", "east", "west")}
        for n in ("atlas", "east", "west"):
            await _start(w, before[n], n)
        for n in ("atlas", "east", "west"):
            await w.wait_acked(n)
        obs = w.plan.observability.prometheus
        url = f"http://127.0.0.1:{obs}/prom/%s/api/v1/status/buildinfo"

        def ok(cluster: str) -> bool:
            return httpx2.get(url % cluster, timeout=5).status_code == 200

        await wait_until_async(lambda: trio.to_thread.run_sync(ok, "east"), timeout=20, what="east")
        stop = threading.Event()
        results: list[int | str] = []

        def loop() -> None:
            with httpx2.Client(timeout=5) as client:
                while not stop.is_set():
                    try:
                        results.append(client.get(url % "east").status_code)
                    except httpx2.HTTPError as exc:
                        results.append(repr(exc))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            # atlasd rotates: new CA, every leaf re-issued, the old CA kept and linked.
            secrets = plan_secrets(plan)
            secrets["atlas-ca"] = with_annotation(plan.ca_secret, labels.CA_ROTATE_ANNOTATION, "")  # type: ignore[assignment]
            rotated = plan_pki(
                secrets=secrets,
                clusters=w.clusters,
                settings=w.settings,
                now=_now(),
                keys=RandomKeys(),
            )
            assert rotated.ca_action == "rotated" and rotated.pki.chain
            hs = f"listener.127.0.0.1_{w.plan.ports_for('east').prometheus}.ssl.handshake"
            east = w.envoys["east"]
            handshakes = (await trio.to_thread.run_sync(east.stats, hs))[hs]
            assert _serve_plan(w, rotated) == {"atlas", "east", "west"}
            for n in ("atlas", "east", "west"):
                await w.wait_acked(n)
            # Requests keep going over fresh handshakes with the new leaves.
            await wait_until_async(
                lambda: trio.to_thread.run_sync(lambda: east.stats(hs)[hs] >= handshakes + 2),
                timeout=20,
                what="fresh handshakes after the rotation",
            )
            # west restarts from its pre-rotation values: its bootstrap trusts only the old
            # CA, the observability Envoy now presents a leaf of the new CA and its link.
            await _restart(w, "west", before["west"])
            await w.wait_acked("west")
            await wait_until_async(
                lambda: trio.to_thread.run_sync(ok, "west"), timeout=20, what="west serving again"
            )
            count = len(results)
            await wait_until_async(
                lambda: len(results) >= count + 20, timeout=20, what="more requests"
            )
        finally:
            stop.set()
            await trio.to_thread.run_sync(thread.join)
        failures = [r for r in results if r != 200]
        assert len(results) > 20
        assert failures == [], f"{len(failures)} of {len(results)} failed: {failures[:5]}"
        print(f"{len(results)} requests through the chain during the rotation and restart")

        # The observability Envoy restarted from its pre-rotation values: atlasd's ADS
        # server presents its new certificate and link; the old client certificate is
        # still trusted (the old CA is in the bundle).
        await _restart(w, "atlas", before["atlas"])
        for n in ("atlas", "east", "west"):
            await w.wait_acked(n, within=60)
        for n in ("east", "west"):
            await wait_until_async(
                lambda n=n: trio.to_thread.run_sync(ok, n), timeout=30, what=f"{n} through it"
            )

        # Negative control: without the link, the old values cannot connect.
        w.pki = helpers.Trust(
            dataclasses.replace(rotated.pki, chain=b""), tuple(rotated.identities.items())
        )
        w.publish()
        await w.wait_acked("atlas")
        unlinked = await _start(w, before["east"], "east-unlinked")
        fail = "cluster.xds_cluster.ssl.fail_verify_error"
        await wait_until_async(
            lambda: trio.to_thread.run_sync(lambda: unlinked.stats(fail).get(fail, 0) >= 1),
            timeout=20,
            what="the unlinked chain refused by a pre-rotation bootstrap",
        )
        assert sum(s.node == "east" for s in w.cache.status()) == 1


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
