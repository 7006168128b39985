"""One stalled cluster cannot stall every query.

The observability Envoy resets a Thanos StoreAPI call through it that carries no bytes
either way for ``Settings.thanos_idle_seconds`` (``--thanos-idle-timeout``), so a real
Thanos Query fanning out over every cluster answers within that bound with the healthy
clusters' series and a warning naming the stalled one (partial response, Thanos's
default). All real processes, configured by atlasd's xDS server:

    Thanos Query (SRV through CoreDNS, as test_dns_thanos)
      -> observability Envoy -> mTLS -> downstream Envoy
         east: -> Thanos sidecar -> Prometheus
         west: -> an Envoy injecting a fault (every Series call held 120 s; Info answered
                  at once, so Query keeps west as a healthy store) -> sidecar -> Prometheus
      -> north: blackholed (a socket that never accepts where its Envoy would be)
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from atlasd.model import DownstreamCluster
from tests.harness.envoy import typed
from tests.harness.net import free_port
from tests.harness.prom import WebProc
from tests.harness.wait import wait_until_async
from tests.integration.test_dns_thanos import Rig, chain_fleet, writer

pytestmark = pytest.mark.integration

IDLE = 3  # the bound under test (the default is 30 s)
HELD = 120  # how long west holds every Series call


def fault_envoy(
    listen_port: int, sidecar_port: int, *, delay: int = HELD, path: str | None = "/Series"
) -> dict[str, Any]:
    """An Envoy in front of a sidecar that holds every StoreAPI call whose path ends in
    ``path`` (None: every call) for ``delay`` seconds."""
    match = (
        {} if path is None else {"headers": [{"name": ":path", "string_match": {"suffix": path}}]}
    )
    hcm = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="fault",
        codec_type="AUTO",
        stream_idle_timeout="0s",
        route_config={
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "sidecar", "timeout": "0s"}}
                    ],
                }
            ]
        },
        http_filters=[
            {
                "name": "envoy.filters.http.fault",
                "typed_config": typed(
                    "envoy.extensions.filters.http.fault.v3.HTTPFault",
                    delay={
                        "fixed_delay": f"{delay}s",
                        "percentage": {"numerator": 100, "denominator": "HUNDRED"},
                    },
                    **match,
                ),
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
            },
        ],
    )
    h2 = typed(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        explicit_http_config={"http2_protocol_options": {}},
    )
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "fault",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "sidecar",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2
                    },
                    "load_assignment": {
                        "cluster_name": "sidecar",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": sidecar_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }


async def test_a_stalled_cluster_costs_a_query_at_most_the_idle_bound(
    tmp_path: Path,
    prometheus_factory: Callable[[str], WebProc],
    envoy_factory: Any,
    request: pytest.FixtureRequest,
) -> None:
    from tests.unit.xds import helpers as xds_helpers
    from tests.unit.xds.world import start_envoy_here, xds_world

    rig = Rig(tmp_path, prometheus_factory, request)
    await rig.start_sidecars("east", "west")
    fault_port = free_port()
    start_envoy_here(
        envoy_factory, fault_envoy(fault_port, rig.sidecars["west"].grpc_port), "fault"
    )
    upstream = {"east": rig.sidecars["east"].grpc_port, "west": fault_port}

    def downstream(name: str) -> DownstreamCluster:
        return xds_helpers.cluster(name, thanos_port=upstream.get(name, free_port()))

    async with xds_world(
        envoy_factory, clusters=("east", "west", "north"), cluster_factory=downstream
    ) as world:
        world.settings = dataclasses.replace(world.settings, thanos_idle_seconds=IDLE)
        world.publish()
        # north is blackholed: where the observability Envoy dials it, a socket that never
        # accepts (the TLS handshake never answers; once its backlog is full, neither
        # does TCP).
        blackhole = socket.socket()
        request.addfinalizer(blackhole.close)
        blackhole.bind(("127.0.0.1", world.plan.ports_for("north").thanos))
        blackhole.listen(0)
        await world.start_ready("atlas", "east", "west")
        obs_port = world.plan.observability.thanos
        async with writer(tmp_path / "atlas.zone") as push:
            await push(chain_fleet(world))
            rig.start_dns_and_query(tmp_path / "atlas.zone")
            # east and west are stores to Query (their Info answers); north never answers
            # its Info, so Query has no store for it and leaves it out of every query.
            want = {
                f"{n}-thanos-sidecar0.monitoring.svc.cluster.local:{obs_port}"
                for n in ("east", "west")
            }

            async def both_stores() -> bool:
                return want <= set(await rig.store_names())

            await wait_until_async(both_stores, timeout=90, what="Query holds east and west")

            async def answer() -> tuple[float, dict[str, Any]] | None:
                """One query over every cluster, once east's sidecar has its first sample."""
                started = time.monotonic()
                async with httpx2.AsyncClient(timeout=HELD) as client:
                    resp = await client.get(
                        f"{rig.url}/api/v1/query",
                        params={"query": "up", "partial_response": "true"},
                    )
                body: dict[str, Any] = resp.json()
                assert body["status"] == "success", body
                found = {r["metric"].get("cluster") for r in body["data"]["result"]}
                return (time.monotonic() - started, body) if "east" in found else None

            took, body = await wait_until_async(answer, timeout=60, what="east's series")
            seen = {r["metric"].get("cluster", "") for r in body["data"]["result"]}
            warnings = body.get("warnings") or []
            # east answers; west is reset by the observability Envoy after IDLE seconds of
            # silence and named in Thanos's partial-response warning; north, blackholed,
            # costs nothing more.
            assert seen == {"east"}, (seen, warnings)
            assert any("west-thanos-sidecar0" in w for w in warnings), warnings
            assert IDLE - 0.5 <= took < IDLE + 10, f"query took {took:.1f} s"
