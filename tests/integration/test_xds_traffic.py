"""Traffic through the Envoys atlasd configures: Prometheus by path (10904 -> 11904),
Thanos gRPC by authority with replica pinning (10901 -> 11901), alerts from a downstream
Prometheus to the observability Alertmanagers (11903 -> 10903), each Alertmanager its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
import trio

from atlasd import model
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until_async
from tests.unit.xds import helpers
from tests.unit.xds.grpc_standin import who
from tests.unit.xds.world import World, xds_world

pytestmark = pytest.mark.integration

AM_CONFIG = 'route:\n  receiver: "null"\n  group_wait: 1s\nreceivers:\n  - name: "null"\n'


async def _get(url: str, **kw: Any) -> httpx2.Response:
    return await trio.to_thread.run_sync(lambda: httpx2.get(url, timeout=5, **kw))


async def _start_all(w: World) -> None:
    await w.start_envoy("atlas")
    for c in w.clusters:
        await w.start_envoy(c.name)
    for name in ("atlas", *(c.name for c in w.clusters)):
        await w.wait_acked(name)
        await w.wait_envoy_ready(name)
    for name, envoy in w.envoys.items():
        log = await trio.to_thread.run_sync(envoy.log_text)
        assert "deprecated" not in log.lower(), f"{name}: {log}"


def _standin(tmp_path: Path, ident: str, host: str, port: int) -> Proc:
    return Proc(
        f"standin-{ident}",
        [sys.executable, "-m", "tests.unit.xds.grpc_standin", ident, host, str(port)],
        log_dir=tmp_path,
        cwd=Path(__file__).resolve().parents[2],
    ).start()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_prometheus_by_path_through_mtls(
    envoy_factory: Any, prometheus_factory: Any, delta: bool
) -> None:
    prom = await trio.to_thread.run_sync(prometheus_factory, "global:\n  scrape_interval: 15s\n")

    def cluster(name: str) -> model.DownstreamCluster:
        # A host name, not an IP: the downstream Envoy resolves it (STRICT_DNS).
        port = prom.port if name == "east" else free_port()
        return helpers.cluster(name, prom_port=port, host="localhost")

    async with xds_world(envoy_factory, cluster_factory=cluster, delta=delta) as w:
        await _start_all(w)
        url = (
            f"http://127.0.0.1:{w.plan.observability.prometheus}/prom/east/api/v1/status/buildinfo"
        )
        r = await _get(url)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "success"
        assert "version" in r.json()["data"]
        r = await _get(url.replace("/prom/east/", "/prom/nowhere/"))
        assert r.status_code == 404


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_thanos_grpc_by_authority_pins_replicas(
    envoy_factory: Any, tmp_path: Path, delta: bool
) -> None:
    # Replica i of "east" is the stand-in at 127.0.<i>.1 (all of 127/8 is loopback).
    port = free_port()
    procs = [_standin(tmp_path, f"replica{i}", f"127.0.{i}.1", port) for i in range(2)]
    try:

        def cluster(name: str) -> model.DownstreamCluster:
            return helpers.cluster(name, replicas=2, thanos_port=port, template="127.0.{replica}.1")

        async with xds_world(
            envoy_factory, clusters=("east",), cluster_factory=cluster, delta=delta
        ) as w:
            await _start_all(w)
            obs = w.plan.observability.thanos
            for i in range(2):
                authority = f"east-thanos-sidecar{i}.monitoring.svc.cluster.local:10901"
                got = await wait_until_async(
                    lambda a=authority: trio.to_thread.run_sync(who, obs, a),
                    timeout=20,
                    what=f"gRPC via {authority}",
                )
                assert got == f"replica{i}"
            # An authority naming no sidecar has no route.
            with pytest.raises(grpc.RpcError) as err:
                await trio.to_thread.run_sync(
                    who, obs, "west-thanos-sidecar0.monitoring.svc.cluster.local:10901"
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # Envoy: no route (404)
    finally:
        for p in procs:
            p.stop()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_alerts_reach_each_alertmanager(
    envoy_factory: Any,
    prometheus_factory: Any,
    alertmanager_factory: Any,
    tmp_path: Path,
    delta: bool,
) -> None:
    ams = [await trio.to_thread.run_sync(alertmanager_factory, AM_CONFIG) for _ in range(2)]
    local = [model.LocalAlertmanager(f"am{i}", "monitoring", am.port) for i, am in enumerate(ams)]
    async with xds_world(envoy_factory, alertmanagers=local, delta=delta) as w:
        await _start_all(w)
        relay = w.plan.ports_for("east").alertmanager
        # A real downstream Prometheus with an always-firing rule, alerting to 11903.
        rules = tmp_path / "rules.yml"
        rules.write_text(
            # "for" outlasts Prometheus's first Alertmanager discovery sync (~5s): an alert
            # firing before it is dropped and only re-sent after resend-delay (1m).
            "groups:\n- name: t\n  rules:\n  - alert: AtlasAlwaysFiring\n    expr: vector(1)\n"
            "    for: 8s\n"
        )
        await trio.to_thread.run_sync(
            prometheus_factory,
            "global:\n  evaluation_interval: 1s\n"
            f"rule_files: [{json.dumps(str(rules))}]\n"
            "alerting:\n  alertmanagers:\n  - static_configs:\n"
            f"    - targets: ['127.0.0.1:{relay}']\n",
        )

        async def alert_names(am: Any) -> set[str]:
            r = await _get(f"{am.url}/api/v2/alerts")
            return {a["labels"]["alertname"] for a in r.json()}

        await wait_until_async(
            lambda: _has(alert_names(ams[0]), "AtlasAlwaysFiring"),
            timeout=60,
            what="the downstream Prometheus alert at alertmanager0",
        )
        # alertmanager1 by authority reaches the second Alertmanager, and only it.
        alert = [{"labels": {"alertname": "ForSecond", "cluster": "east"}}]
        host = "alertmanager1.monitoring.svc.cluster.local"
        r = await trio.to_thread.run_sync(
            lambda: httpx2.post(
                f"http://127.0.0.1:{relay}/api/v2/alerts",
                json=alert,
                headers={"host": host},
                timeout=5,
            )
        )
        assert r.status_code == 200, r.text
        assert "ForSecond" in await alert_names(ams[1])
        assert "ForSecond" not in await alert_names(ams[0])


async def _has(names: Any, want: str) -> bool:
    return want in await names
