"""Revocation through real Envoys: atlas -> east and atlas -> west over mTLS to a real
Prometheus. Once east's certificates are revoked (the fleet's CRL and revoked hashes, as
``atlasd cluster revoke`` makes them), the observability Envoy refuses east's server
certificate in the handshake and atlasd ends and refuses east's xDS stream (its bootstrap
client certificate is revoked too), while west keeps answering; east redeployed with
re-issued certificates answers again."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import httpx
import pytest
import trio

from atlasd import model, revocation
from tests.harness.wait import wait_until_async
from tests.unit.xds import helpers
from tests.unit.xds.world import World, xds_world

pytestmark = pytest.mark.integration


def _revoke(w: World, node: str) -> model.Revocation:
    """What the fleet derives from ``atlasd cluster revoke <node>``'s entries."""
    ident = w.pki.identity(node)
    assert ident is not None
    now = dt.datetime.now(dt.UTC)
    entries = [
        revocation.revoke(node, "server", ident.server.cert_pem, now=now),
        revocation.revoke(node, "client", ident.client.cert_pem, now=now),
    ]
    return revocation.revocations(
        entries, ca_cert_pem=w.ca.material.cert_pem, ca_key_pem=w.ca.material.key_pem, now=now
    )[node]


def _streams(w: World, node: str) -> int:
    return sum(1 for st in w.cache.status() if st.node == node)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_revoked_cluster_is_refused_others_keep_working_redeploy_restores(
    envoy_factory: Any, prometheus_factory: Any, delta: bool
) -> None:
    prom = await trio.to_thread.run_sync(prometheus_factory, "global:\n  scrape_interval: 15s\n")
    async with xds_world(
        envoy_factory,
        delta=delta,
        clusters=("east", "west"),
        cluster_factory=lambda n: helpers.cluster(n, prom_port=prom.port),
    ) as w:
        await w.start_ready("atlas", "east", "west")
        base = f"http://127.0.0.1:{w.plan.observability.prometheus}/prom"

        def ok(cluster: str) -> bool:
            url = f"{base}/{cluster}/api/v1/status/buildinfo"
            try:
                return httpx.get(url, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        for c in ("east", "west"):
            await wait_until_async(
                lambda c=c: trio.to_thread.run_sync(ok, c), timeout=20, what=f"{c} answers"
            )
        # West is asked all along: a revocation of east must not cost it one request.
        stop = threading.Event()
        west: list[bool] = []

        def loop() -> None:
            while not stop.is_set():
                west.append(ok("west"))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            atlas = w.envoys["atlas"]
            fail = "cluster.east-prom.ssl.fail_verify_error"
            before = (await trio.to_thread.run_sync(atlas.stats, fail)).get(fail, 0)
            t0 = time.monotonic()
            w.revocations["east"] = _revoke(w, "east")
            w.publish()
            await wait_until_async(
                lambda: trio.to_thread.run_sync(lambda: not ok("east")),
                timeout=10,
                what="the observability Envoy refuses east's revoked certificate",
            )
            refused_after = time.monotonic() - t0
            print(f"revoke -> refused: {refused_after:.3f} s")
            # Refused in the handshake, by the certificate check (the CRL), not by a route.
            stats = await trio.to_thread.run_sync(atlas.stats, fail)
            assert stats.get(fail, 0) > before, stats
            # atlasd ended east's xDS stream and refuses it again (its client certificate).
            await wait_until_async(
                lambda: _streams(w, "east") == 0, timeout=10, what="east's xDS stream ended"
            )
            assert await trio.to_thread.run_sync(ok, "west")
            # Redeploy: east's certificates re-issued, its Envoy restarted from them.
            w.pki = w.pki.with_identities(
                tuple(
                    (n, helpers.identity(w.ca, n) if n == "east" else i)
                    for n, i in w.pki.identities
                )
            )
            w.publish()
            await trio.to_thread.run_sync(w.envoys["east"].stop)
            await w.start_envoy("east", name="east-redeployed")
            await w.wait_acked("east")
            await w.wait_envoy_ready("east-redeployed")
            await wait_until_async(
                lambda: trio.to_thread.run_sync(ok, "east"),
                timeout=20,
                what="east answers again with its re-issued certificates",
            )
        finally:
            stop.set()
            await trio.to_thread.run_sync(thread.join)
        assert len(west) > 5
        assert all(west), f"{west.count(False)} of {len(west)} requests to west failed"
