"""Which hop is broken: ``atlasd.query.probe`` against real Envoys configured by atlasd's
xDS server, a real Thanos sidecar, and each failure injected for real.

    probe -> observability Envoy (Thanos listener, by authority) -> mTLS -> downstream
    Envoy -> Thanos sidecar (east) | a closed port (west) | an Envoy holding every call
    4 s (south)

north has no downstream Envoy at all; ghost is not served.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from atlasd.model import DownstreamCluster
from atlasd.query.probe import Finding, probe, probe_prometheus
from tests.harness.net import free_port
from tests.harness.prom import WebProc
from tests.integration.daemon_helpers import cli as run_cli
from tests.integration.test_dns_thanos import Rig
from tests.integration.test_query_bounds import fault_envoy

pytestmark = pytest.mark.integration


async def test_each_broken_hop_is_named(
    tmp_path: Path,
    prometheus_factory: Callable[[str], WebProc],
    envoy_factory: Any,
    request: pytest.FixtureRequest,
) -> None:
    from tests.unit.xds import helpers as xds_helpers
    from tests.unit.xds.world import start_envoy_here, xds_world

    rig = Rig(tmp_path, prometheus_factory, request)  # its sidecars only
    await rig.start_sidecars("east")
    held = free_port()
    boot = fault_envoy(held, rig.sidecars["east"].grpc_port, delay=4, path=None)
    start_envoy_here(envoy_factory, boot, "held")
    upstream = {"east": rig.sidecars["east"].grpc_port, "west": free_port(), "south": held}

    def downstream(name: str) -> DownstreamCluster:
        # east's Prometheus is real; the others' Prometheus ports are closed.
        prom = rig.proms["east"].port if name == "east" else free_port()
        return xds_helpers.cluster(
            name, thanos_port=upstream.get(name, free_port()), prom_port=prom
        )

    names = ("east", "west", "north", "south")
    async with xds_world(envoy_factory, clusters=names, cluster_factory=downstream) as w:
        await w.start_ready("atlas", "east", "west", "south")
        address = f"127.0.0.1:{w.plan.observability.thanos}"
        s = w.settings

        async def look(c: str, **kw: Any) -> Finding:
            host = f"{c}-thanos-sidecar0.{s.namespace}.svc.{s.cluster_domain}"
            return await probe(c, address=kw.pop("address", address), authority=host, **kw)

        ok = await look("east")
        assert ok.hop == "ok", ok
        assert {"cluster": "east"} in [dict(ls) for ls in ok.labels], ok.labels
        # Every time (Envoy's own upstream-time header is not always passed on).
        assert {(await look("west")).hop for _ in range(12)} == {"upstream-down"}
        west = await look("west")
        assert west.hop == "upstream-down", west
        assert (await look("north")).hop == "cluster-unreachable"
        ghost = await look("ghost")
        assert ghost.hop == "no-route", ghost
        assert (await look("south", slow_after=2)).hop == "slow"
        assert (await look("south", within=1)).hop == "timeout"
        closed = f"127.0.0.1:{free_port()}"
        assert (await look("east", address=closed)).hop == "envoy-unreachable"

        # The Prometheus path: /prom/<c>/-/ready through the observability Envoy's 10904.
        prom_via = f"127.0.0.1:{w.plan.observability.prometheus}"
        hops = {
            c: (await probe_prometheus(c, address=prom_via)).hop
            for c in ("east", "west", "north", "ghost")
        }
        assert hops == {
            "east": "ok",
            "west": "upstream-down",
            "north": "cluster-unreachable",
            "ghost": "no-route",
        }

        # The CLI: one line per cluster, exit 1 when a hop is broken, -o json.
        s_ns = f"--namespace={s.namespace}"
        good = await trio.to_thread.run_sync(
            lambda: run_cli(
                "probe",
                "east",
                f"--via={address}",
                f"--prometheus-via={prom_via}",
                s_ns,
                check=False,
            )
        )
        assert good.returncode == 0, good.stderr
        assert good.stdout.startswith("east: ok"), good.stdout
        assert "east (prometheus): ok (ready in" in good.stdout, good.stdout
        bad = await trio.to_thread.run_sync(
            lambda: run_cli(
                "probe", "west", "north", f"--via={address}", s_ns, "-o", "json", check=False
            )
        )
        assert bad.returncode == 1, bad.stderr
        doc = json.loads(bad.stdout)
        assert [(f["cluster"], f["hop"]) for f in doc] == [
            ("west", "upstream-down"),
            ("north", "cluster-unreachable"),
        ]
        assert all(f["fix"] for f in doc)
