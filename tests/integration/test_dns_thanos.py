"""A real Thanos Query discovers real Thanos sidecars through the zone atlasd writes.

The chain, all real processes on loopback:

    zone writer -> atlas.zone -> CoreDNS (file plugin, reload 1s)
    Thanos Query --endpoint=dnssrvnoa+_thanos._tcp.sidecars.thanos.atlas.
        -> <cluster>-thanos-sidecar0.monitoring.svc.cluster.local:<port>
        -> [observability Envoy -> mTLS -> downstream Envoy]   (second test only)
        -> Thanos sidecar -> Prometheus (external label cluster=<name>)

The first test dials the sidecars directly (add and remove clusters); the second goes
through the Envoy chain configured by atlasd's xDS server, as in production: the SRV
target names the sidecar Service, which resolves to the observability Envoy, which
routes by that authority to the downstream cluster. The same CoreDNS answers every
``*.cluster.local`` A query with 127.0.0.1 (``template`` plugin, standing in for the
cluster DNS).

Thanos resolves through ``/etc/resolv.conf`` (there is no flag for a DNS server), so
Thanos Query runs in a private mount namespace (``unshare -m``) where a test
resolv.conf is bind-mounted over it, naming a CoreDNS on port 53 of a random
127.x.y.53 address. That needs root (port 53, mount namespace); without it, or
without a built Thanos, the tests are skipped and say why.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from atlasd.dns.writer import run_zone_writer
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness import components
from tests.harness.feed import fed
from tests.harness.net import free_port
from tests.harness.netns import require_namespaces
from tests.harness.procs import Proc
from tests.harness.prom import WebProc
from tests.harness.wait import wait_until, wait_until_async

pytestmark = pytest.mark.integration

SETTINGS = Settings(namespace="monitoring")
SRV = "_thanos._tcp.sidecars.thanos.atlas."


def thanos_binary() -> Path:
    # `make test` builds Thanos with the other components; a missing one is built here
    # (and a build failure fails the test: no skipping a component that can be had).
    return components.thanos()


def dns_address() -> str:
    """A loopback address whose port 53 is free (needs root to bind)."""
    require_namespaces("port 53 and a mount namespace for Thanos")
    for _ in range(20):
        addr = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.53"
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((addr, 53))
        except OSError:
            continue
        return addr
    pytest.skip("no free loopback address for port 53")


def corefile(addr: str, zone: Path) -> str:
    return (
        f"atlas.:53 {{\n    bind {addr}\n    file {zone} atlas. {{\n        reload 1s\n"
        f"    }}\n    errors\n}}\n"
        # Stand-in for the cluster DNS: every sidecar Service name -> loopback.
        f"cluster.local.:53 {{\n    bind {addr}\n"
        f"    template IN A cluster.local {{\n"
        f'        answer "{{{{ .Name }}}} 60 IN A 127.0.0.1"\n    }}\n'
        f"    template IN AAAA cluster.local {{\n        rcode NOERROR\n    }}\n}}\n"
    )


def prom_config(cluster: str, port_holder: str) -> str:
    return (
        "global:\n  scrape_interval: 1s\n"
        f"  external_labels: {{cluster: {cluster}}}\n"
        "scrape_configs:\n  - job_name: atlas-test\n"
        f"    static_configs: [{{targets: ['{port_holder}']}}]\n"
    )


class Sidecar:
    def __init__(self, thanos: Path, prom: WebProc, workdir: Path, name: str) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.proc = Proc(
            f"sidecar-{name}",
            [
                str(thanos),
                "sidecar",
                f"--prometheus.url={prom.url}",
                f"--tsdb.path={workdir / f'sidecar-{name}-tsdb'}",
                f"--grpc-address=127.0.0.1:{self.grpc_port}",
                f"--http-address=127.0.0.1:{self.http_port}",
            ],
            log_dir=workdir,
        )

    def start(self) -> Sidecar:
        self.proc.start()
        wait_until(self._ready, timeout=60, what=f"{self.proc.name} ready")
        return self

    def _ready(self) -> bool:
        self.proc.check_running()
        url = f"http://127.0.0.1:{self.http_port}/-/ready"
        return httpx2.get(url, timeout=2).status_code == 200


def cluster(name: str, sidecar: Sidecar) -> DownstreamCluster:
    return DownstreamCluster(
        name=name,
        external_ip="203.0.113.1",
        ports=(ServicePort("thanos", sidecar.grpc_port),),
    )


@asynccontextmanager
async def writer(path: Path) -> AsyncIterator[Callable[[Fleet], Any]]:
    """The zone writer on ``path``; the push returns once the zone is written."""
    async with fed(
        run_zone_writer, callback="on_zone", path=path, kube=None, settings=SETTINGS
    ) as w:
        yield functools.partial(w.push, what="zone write")


def chain_fleet(world: Any) -> Fleet:
    """The fleet of an xDS test world as the zone publishes it for the Envoy chain. In a
    cluster, <cluster>-thanos-sidecar<i> is a headless Service on port 10901 selecting the
    observability Envoy; here the Envoy's Thanos listener has its own port, so that is the
    port the sidecar Services (and SRV records) carry."""
    port = world.plan.observability.thanos
    return Fleet.of(
        world.settings,
        tuple(dataclasses.replace(c, ports=(ServicePort("thanos", port),)) for c in world.clusters),
    )


class Rig:
    """The real processes of one test: Prometheus + sidecar per cluster, CoreDNS on :53,
    Thanos Query in its own mount namespace. Everything is stopped at test end."""

    def __init__(
        self,
        tmp_path: Path,
        prometheus_factory: Callable[[str], WebProc],
        request: pytest.FixtureRequest,
    ) -> None:
        self.thanos = thanos_binary()
        self.addr = dns_address()
        self.tmp_path = tmp_path
        self.prometheus_factory = prometheus_factory
        self.request = request
        self.procs: list[Proc] = []
        self.sidecars: dict[str, Sidecar] = {}
        self.proms: dict[str, WebProc] = {}
        self.url = ""

    def _track(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        self.request.addfinalizer(proc.stop)
        return proc

    async def start_sidecars(self, *names: str) -> None:
        for name in names:
            # Each Prometheus scrapes a target that is down: `up == 0` is a series all the
            # same, labeled with the cluster (external label) by the sidecar.
            prom = await trio.to_thread.run_sync(
                self.prometheus_factory, prom_config(name, f"127.0.0.1:{free_port()}")
            )
            sidecar = Sidecar(self.thanos, prom, self.tmp_path, name)
            self._track(sidecar.proc)
            self.sidecars[name] = await trio.to_thread.run_sync(sidecar.start)
            self.proms[name] = prom

    def start_dns_and_query(self, zone: Path) -> None:
        (self.tmp_path / "Corefile").write_text(corefile(self.addr, zone))
        self._track(
            Proc(
                "coredns-53",
                [str(components.coredns()), "-conf", str(self.tmp_path / "Corefile")],
                log_dir=self.tmp_path,
            )
        ).start()
        resolv = self.tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {self.addr}\noptions ndots:1 timeout:1 attempts:2\n")
        http_port = free_port()
        query_argv = [
            str(self.thanos),
            "query",
            f"--http-address=127.0.0.1:{http_port}",
            f"--grpc-address=127.0.0.1:{free_port()}",
            f"--endpoint=dnssrvnoa+{SRV}",
            "--store.sd-dns-interval=1s",
        ]
        script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        self._track(
            Proc("thanos-query", [*argv, str(resolv), *query_argv], log_dir=self.tmp_path)
        ).start()
        self.url = f"http://127.0.0.1:{http_port}"

    async def clusters_seen(self) -> set[str]:
        async with httpx2.AsyncClient(timeout=3) as client:
            resp = await client.get(f"{self.url}/api/v1/query", params={"query": "up"})
        for proc in self.procs:
            proc.check_running()
        body = resp.json()
        assert body["status"] == "success", body
        return {r["metric"].get("cluster", "") for r in body["data"]["result"]}

    async def wait_sees(self, want: set[str], *, within: float = 60) -> None:
        async def sees() -> bool:
            return await self.clusters_seen() == want

        await wait_until_async(sees, timeout=within, what=f"Thanos Query sees {sorted(want)}")

    async def store_names(self) -> list[str]:
        async with httpx2.AsyncClient(timeout=3) as client:
            stores = (await client.get(f"{self.url}/api/v1/stores")).json()["data"]
        return sorted(s["name"] for group in stores.values() for s in group)


async def test_thanos_query_discovers_sidecars_through_coredns(
    tmp_path: Path,
    prometheus_factory: Callable[[str], WebProc],
    request: pytest.FixtureRequest,
) -> None:
    rig = Rig(tmp_path, prometheus_factory, request)
    await rig.start_sidecars("east", "west")
    east, west = cluster("east", rig.sidecars["east"]), cluster("west", rig.sidecars["west"])
    zone = tmp_path / "atlas.zone"
    async with writer(zone) as push:
        await push(Fleet.of(SETTINGS, (east,)))
        rig.start_dns_and_query(zone)
        await rig.wait_sees({"east"}, within=90)

        # Add a cluster: a new SRV record, a new store, its series in the answer.
        await push(Fleet.of(SETTINGS, (east, west)))
        await rig.wait_sees({"east", "west"})

        # Remove one: Thanos drops the endpoint that left DNS, and its series with it.
        await push(Fleet.of(SETTINGS, (west,)))
        await rig.wait_sees({"west"})
        port = rig.sidecars["west"].grpc_port
        assert await rig.store_names() == [
            f"west-thanos-sidecar0.monitoring.svc.cluster.local:{port}"
        ]


async def test_thanos_query_through_coredns_and_the_envoy_chain(
    tmp_path: Path,
    prometheus_factory: Callable[[str], WebProc],
    envoy_factory: Any,
    request: pytest.FixtureRequest,
) -> None:
    """The production path: SRV -> observability Envoy (route by authority) -> mTLS ->
    downstream Envoy -> sidecar. Envoy configuration comes from atlasd's xDS server."""
    # Imported here: the xDS test world is another module's harness; a problem there
    # should fail this test, not the collection of the direct one above.
    from tests.unit.xds import helpers as xds_helpers
    from tests.unit.xds.world import xds_world

    rig = Rig(tmp_path, prometheus_factory, request)
    await rig.start_sidecars("east", "west")

    def downstream(name: str) -> DownstreamCluster:
        # The downstream Envoy's Thanos upstream is this cluster's real sidecar.
        return xds_helpers.cluster(name, thanos_port=rig.sidecars[name].grpc_port)

    async with xds_world(
        envoy_factory, clusters=("east", "west"), cluster_factory=downstream
    ) as world:
        await world.start_ready("atlas", "east", "west")
        obs_port = world.plan.observability.thanos
        zone = tmp_path / "atlas.zone"
        async with writer(zone) as push:
            await push(chain_fleet(world))
            rig.start_dns_and_query(zone)
            await rig.wait_sees({"east", "west"}, within=90)
            assert await rig.store_names() == [
                f"{n}-thanos-sidecar0.monitoring.svc.cluster.local:{obs_port}"
                for n in ("east", "west")
            ]
