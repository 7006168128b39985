"""CA rotation while a loop of requests runs through atlas -> east over mTLS: trust both
CAs, re-issue every leaf under the new CA, then drop the old CA. No request fails."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import httpx
import pytest
import trio

from tests.harness.certs import CA
from tests.harness.wait import wait_until_async
from tests.unit.xds import helpers
from tests.unit.xds.world import World, xds_world

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
            lambda: trio.to_thread.run_sync(lambda: httpx.get(url, timeout=5).status_code == 200),
            timeout=20,
            what="first request through",
        )

        stop = threading.Event()
        results: list[int | str] = []

        def loop() -> None:
            with httpx.Client(timeout=5) as client:
                while not stop.is_set():
                    try:
                        results.append(client.get(url).status_code)
                    except httpx.HTTPError as exc:
                        results.append(repr(exc))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            old_ca = w.ca
            new_ca = CA("atlas-test-ca-2")
            # 1. Trust both (new first), leaves unchanged.
            w.pki = dataclasses.replace(
                w.pki,
                pki=dataclasses.replace(w.pki.pki, trust_bundle=new_ca.cert_pem + old_ca.cert_pem),
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
                w.pki, pki=dataclasses.replace(w.pki.pki, trust_bundle=new_ca.cert_pem)
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
