"""Revocation through real Envoys: atlas -> east and atlas -> west over mTLS to a real
Prometheus. Once east's certificates are revoked (the fleet's CRL and revoked hashes, as
``atlasd cluster revoke`` makes them), the observability Envoy refuses east's server
certificate in the handshake and atlasd ends and refuses east's xDS stream (its bootstrap
client certificate is revoked too), while west keeps answering; east redeployed with
re-issued certificates answers again."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from atlasd import model, revocation
from tests.harness.wait import wait_until_async
from tests.integration.daemon_helpers import answers_through_chain
from tests.unit.xds import helpers
from tests.unit.xds.world import World, xds_world

AM_CONFIG = 'route:\n  receiver: "null"\n  group_wait: 1s\nreceivers:\n  - name: "null"\n'

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

        def ok(cluster: str) -> bool:
            return answers_through_chain(cluster, w.plan.observability.prometheus)

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


def _post_alert(w: World, node: str, tmp: Path) -> int:
    """POST an alert to the observability Envoy's 10903 with ``node``'s client certificate
    (as its Envoy's alert relay does); the HTTP status."""
    ident = w.pki.identity(node)
    assert ident is not None
    (tmp / f"{node}.crt").write_bytes(ident.client.cert_pem)
    (tmp / f"{node}.key").write_bytes(ident.client.key_pem)
    (tmp / "ca.pem").write_bytes(w.pki.trust_bundle)
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
    ctx.check_hostname = False  # the observability Envoy's certificate names "atlas"
    ctx.load_cert_chain(str(tmp / f"{node}.crt"), str(tmp / f"{node}.key"))
    r = httpx2.post(
        f"https://127.0.0.1:{w.plan.observability.alertmanager}/api/v2/alerts",
        json=[{"labels": {"alertname": f"From{node}", "cluster": node}}],
        headers={"host": "alertmanager0.monitoring.svc.cluster.local"},
        verify=ctx,
        timeout=5,
    )
    return r.status_code


async def test_a_revoked_client_certificate_cannot_post_alerts(
    envoy_factory: Any, alertmanager_factory: Any, tmp_path: Path
) -> None:
    am = await trio.to_thread.run_sync(alertmanager_factory, AM_CONFIG)
    local = [model.LocalAlertmanager("am0", "monitoring", am.port)]
    async with xds_world(envoy_factory, clusters=("east", "west"), alertmanagers=local) as w:
        await w.start_ready("atlas")

        async def status(node: str) -> int:
            return await trio.to_thread.run_sync(_post_alert, w, node, tmp_path)

        await wait_until_async(
            lambda: _is(status("east"), 200), timeout=20, what="east's alert accepted"
        )
        w.revocations["east"] = _revoke(w, "east")
        w.publish()
        await wait_until_async(
            lambda: _is(status("east"), 403),
            timeout=10,
            what="east's revoked client certificate refused by the alertmanager routes",
        )
        assert await status("west") == 200
        r = await trio.to_thread.run_sync(lambda: httpx2.get(f"{am.url}/api/v2/alerts", timeout=5))
        assert {a["labels"]["alertname"] for a in r.json()} >= {"Fromeast", "Fromwest"}
        # East re-issued: its new client certificate posts again.
        w.pki = w.pki.with_identities(
            tuple((n, helpers.identity(w.ca, n) if n == "east" else i) for n, i in w.pki.identities)
        )
        w.publish()
        assert await status("east") == 200


async def _is(value: Any, want: int) -> bool:
    return bool(await value == want)


async def test_a_ca_rotation_does_not_make_a_revoked_certificate_good_again(
    envoy_factory: Any, prometheus_factory: Any
) -> None:
    """After a rotation the CRL is signed by the new CA; the revoked leaf, signed by the
    old one (still trusted), must stay refused: a CRL by another key never clears it. A
    leaf of the old CA that is not revoked is refused too (fail closed) until the cluster
    has a leaf of the new CA."""
    prom = await trio.to_thread.run_sync(prometheus_factory, "global:\n  scrape_interval: 15s\n")
    async with xds_world(
        envoy_factory,
        clusters=("east",),
        cluster_factory=lambda n: helpers.cluster(n, prom_port=prom.port),
        upstream_connection_seconds=1,
    ) as w:
        await w.start_ready("atlas", "east")
        url = (
            f"http://127.0.0.1:{w.plan.observability.prometheus}/prom/east/api/v1/status/buildinfo"
        )

        def ok() -> bool:
            try:
                return httpx2.get(url, timeout=5).status_code == 200
            except httpx2.HTTPError:
                return False

        await wait_until_async(lambda: trio.to_thread.run_sync(ok), timeout=20, what="east")
        ident = w.pki.identity("east")
        assert ident is not None
        now = dt.datetime.now(dt.UTC)
        entries = [revocation.revoke("east", "server", ident.server.cert_pem, now=now)]
        w.revocations["east"] = _revoke(w, "east")
        w.publish()
        await wait_until_async(
            lambda: trio.to_thread.run_sync(lambda: not ok()), timeout=10, what="refused"
        )
        # Rotate: the new CA first in the bundle, the old one still trusted, the CRL of the
        # same entries now signed by the new CA. East still presents its revoked leaf.
        old_ca, new_ca = w.ca, helpers.make_ca("atlas-test-ca-2")
        w.pki = dataclasses.replace(
            w.pki,
            pki=dataclasses.replace(w.pki.pki, trust_bundle=new_ca.bundle + w.ca.bundle),
        )
        w.ca = new_ca
        w.revocations["east"] = revocation.revocations(
            entries, ca_cert_pem=new_ca.material.cert_pem, ca_key_pem=new_ca.material.key_pem,
            now=now,
        )["east"]  # fmt: skip
        w.publish()
        await w.wait_acked("atlas")
        atlas = w.envoys["atlas"]
        fail = "cluster.east-prom.ssl.fail_verify_error"
        before = (await trio.to_thread.run_sync(atlas.stats, fail)).get(fail, 0)
        for _ in range(5):
            assert not await trio.to_thread.run_sync(ok)
        after = (await trio.to_thread.run_sync(atlas.stats, fail)).get(fail, 0)
        assert after > before
        # East redeployed with a leaf of the *old* CA that is not revoked: the CRL of the
        # new CA does not vouch for it either; refused until east has a leaf of the new CA
        # (which a rotation gives every cluster over SDS). Fails closed.
        w.pki = w.pki.with_identities(
            tuple(
                (n, helpers.identity(old_ca, n) if n == "east" else i) for n, i in w.pki.identities
            )
        )
        w.publish()
        await trio.to_thread.run_sync(w.envoys["east"].stop)
        await w.start_envoy("east", name="east-old-ca")
        await w.wait_acked("east")
        await w.wait_envoy_ready("east-old-ca")
        for _ in range(5):
            assert not await trio.to_thread.run_sync(ok)
        w.pki = w.pki.with_identities(
            tuple(
                (n, helpers.identity(new_ca, n) if n == "east" else i) for n, i in w.pki.identities
            )
        )
        w.publish()
        await wait_until_async(
            lambda: trio.to_thread.run_sync(ok),
            timeout=20,
            what="east answers with a leaf of the new CA (over SDS, no restart)",
        )
