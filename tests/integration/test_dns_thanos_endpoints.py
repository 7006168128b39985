"""A real Thanos Query discovers real Thanos sidecars from atlasd's endpoint configuration.

    endpoints writer -> <dir>/all.yaml, group-<g>.yaml
    Thanos Query --endpoint.sd-config-file=<dir>/all.yaml (re-read every second)
        -> <cluster>-thanos-sidecar0.monitoring.svc.cluster.local:<port>
        -> Thanos sidecar -> Prometheus (external label cluster=<name>)

No SRV lookup is involved (that is the point: no 65,535-byte ceiling), but the addresses
are the sidecar Service names, which a cluster's DNS resolves; here the CoreDNS of
``test_dns_thanos`` stands in for it (``*.cluster.local`` -> 127.0.0.1), with Thanos
Query in a private mount namespace whose resolv.conf names it (root and unshare, or the
test is skipped, as there).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from atlasd.dns.endpoints import ALL_KEY
from atlasd.dns.endpoints_writer import run_endpoints_writer
from atlasd.dns.zone import render_zone
from atlasd.model import DownstreamCluster, Fleet
from tests.harness import components
from tests.harness.feed import fed
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.prom import WebProc
from tests.integration.test_dns_thanos import SETTINGS, Rig, corefile
from tests.integration.test_dns_thanos import cluster as sidecar_cluster

pytestmark = pytest.mark.integration


@asynccontextmanager
async def endpoints_writer(directory: Path) -> AsyncIterator[Callable[[Fleet], Any]]:
    """The endpoints writer on ``directory``; the push returns once its files are written."""
    async with fed(
        run_endpoints_writer, callback="on_files", path=directory, kube=None, settings=SETTINGS
    ) as w:
        yield functools.partial(w.push, what="files written")


def start_dns_and_query_from_file(rig: Rig, config: Path) -> None:
    """CoreDNS standing in for the cluster DNS, and Thanos Query reading ``config``."""
    zone = rig.tmp_path / "atlas.zone"
    zone.write_text(render_zone(Fleet.of(SETTINGS), serial=1))
    (rig.tmp_path / "Corefile").write_text(corefile(rig.addr, zone))
    rig._track(
        Proc(
            "coredns-53",
            [str(components.coredns()), "-conf", str(rig.tmp_path / "Corefile")],
            log_dir=rig.tmp_path,
        )
    ).start()
    resolv = rig.tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {rig.addr}\noptions ndots:1 timeout:1 attempts:2\n")
    http_port = free_port()
    query_argv = [
        str(rig.thanos),
        "query",
        f"--http-address=127.0.0.1:{http_port}",
        f"--grpc-address=127.0.0.1:{free_port()}",
        f"--endpoint.sd-config-file={config}",
        "--endpoint.sd-config-reload-interval=1s",
        "--store.sd-dns-interval=1s",
    ]
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
    rig._track(
        Proc("thanos-query", [*argv, str(resolv), *query_argv], log_dir=rig.tmp_path)
    ).start()
    rig.url = f"http://127.0.0.1:{http_port}"


def grouped(c: DownstreamCluster, group: str | None) -> DownstreamCluster:
    return dataclasses.replace(c, dns_group=group)


async def test_thanos_query_discovers_sidecars_from_the_endpoint_configuration(
    tmp_path: Path,
    prometheus_factory: Callable[[str], WebProc],
    request: pytest.FixtureRequest,
) -> None:
    rig = Rig(tmp_path, prometheus_factory, request)
    await rig.start_sidecars("east", "west")
    east = sidecar_cluster("east", rig.sidecars["east"])
    west = sidecar_cluster("west", rig.sidecars["west"])
    directory = tmp_path / "endpoints"
    async with endpoints_writer(directory) as push:
        await push(Fleet.of(SETTINGS, (east,)))
        start_dns_and_query_from_file(rig, directory / ALL_KEY)
        await rig.wait_sees({"east"}, within=90)

        # Add a cluster (in a group: it is in all.yaml all the same).
        await push(Fleet.of(SETTINGS, (east, grouped(west, "prod"))))
        assert (directory / "group-prod.yaml").exists()
        await rig.wait_sees({"east", "west"})

        # Remove one: Thanos drops the endpoint that left the file, and its series.
        await push(Fleet.of(SETTINGS, (grouped(west, "prod"),)))
        await rig.wait_sees({"west"})
        port = rig.sidecars["west"].grpc_port
        assert await rig.store_names() == [
            f"west-thanos-sidecar0.monitoring.svc.cluster.local:{port}"
        ]
