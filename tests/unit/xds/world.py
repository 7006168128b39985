"""A running xDS world for integration tests: atlasd's ADS server (in this Trio process,
TLS and plaintext on one port), the observability Envoy (over mTLS, as its values have it)
and downstream Envoys on loopback, each with its own ports."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from atlasd import model
from atlasd.reconcile.certs import CA
from atlasd.xds.authz import Authorizer, RevokedCerts
from atlasd.xds.builders import SnapshotBuilder
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.plan import ListenPlan, NodePorts, ObservabilityPorts
from atlasd.xds.server import run_ads_server
from atlasd.xds.streams import XdsMetrics
from atlasd.xds.tls import ServerTls, TlsMaterial
from tests.harness.envoy import Envoy
from tests.harness.net import free_port
from tests.harness.wait import wait_until_async
from tests.unit.xds import helpers

EnvoyFactory = Callable[[dict[str, Any], str], Envoy]


async def _no_restart() -> None:
    raise RuntimeError("server not running")


def start_envoy_here(factory: EnvoyFactory, boot: dict[str, Any], name: str) -> Envoy:
    """Start an Envoy from the Trio thread itself (it blocks until the admin address is
    known, a fraction of a second). Not from a worker thread: Envoy asks for SIGTERM when
    the thread that forked it exits (PR_SET_PDEATHSIG), and Trio ends a worker thread
    after 10 s idle, so an Envoy started by ``trio.to_thread`` died 10 s into a quiet
    wait."""
    return factory(boot, name)


@dataclasses.dataclass
class World:
    ca: CA
    pki: helpers.Trust
    settings: model.Settings
    plan: ListenPlan
    builder: SnapshotBuilder
    cache: SnapshotCache
    registry: CollectorRegistry
    ads_port: int
    clusters: list[model.DownstreamCluster]
    alertmanagers: list[model.LocalAlertmanager]
    envoy_factory: EnvoyFactory
    delta: bool
    # atlasd's ADS server certificate and the TLS it serves (follows ``pki`` on publish).
    ads_cert: model.CertKey
    ads_tls: ServerTls
    token: str | None = None
    restart_server: Callable[[], Awaitable[None]] = dataclasses.field(default=_no_restart)
    envoys: dict[str, Envoy] = dataclasses.field(default_factory=dict)
    # Revoked certificates by cluster (the fleet's), and the set the ADS authorizer reads.
    revocations: dict[str, model.Revocation] = dataclasses.field(default_factory=dict)
    revoked: RevokedCerts = dataclasses.field(default_factory=RevokedCerts)

    def fleet(self) -> model.Fleet:
        fleet = self.pki.fleet(tuple(self.clusters), tuple(self.alertmanagers), self.settings)
        return dataclasses.replace(fleet, revocations=dict(self.revocations))

    def publish(self) -> set[str]:
        """Serve the world's state, as the daemon's xDS subsystem does: the revoked set
        first (a stream standing on a newly revoked certificate is woken and ends), then
        the snapshots."""
        self.ads_tls.update(
            TlsMaterial(cert=self.ads_cert, chain=self.pki.pki.chain, trust=self.pki.trust_bundle)
        )
        for name in self.revoked.update(self.revocations):
            self.cache.wake(name)
        return self.cache.publish(self.builder.build(self.fleet()))

    def add_cluster(self, c: model.DownstreamCluster) -> None:
        ident = self.pki.identity(c.name) or helpers.identity(self.ca, c.name)
        if self.pki.identity(c.name) is None:
            self.pki = self.pki.with_identities((*self.pki.identities, (c.name, ident)))
        ports = NodePorts(
            thanos=free_port(),
            prometheus=free_port(),
            alertmanager=free_port(),
            address="127.0.0.1",
        )
        self.plan = dataclasses.replace(
            self.plan, downstream=(*self.plan.downstream, (c.name, ports))
        )
        self.builder.plan = self.plan
        self.clusters.append(c)

    def remove_cluster(self, name: str) -> None:
        self.clusters = [c for c in self.clusters if c.name != name]

    async def start_envoy(
        self,
        node: str,
        *,
        as_node: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        name: str | None = None,
    ) -> Envoy:
        """Start the Envoy of ``node`` (bootstrapped with ``node``'s certificate); ``as_node``
        makes it ask for another node id (authorization tests); ``name``: the Envoy's own
        (a second Envoy of one node, e.g. redeployed)."""
        if node == model.OBSERVABILITY_NODE:
            boot = helpers.atlas_bootstrap(
                self.ads_port, self.pki, delta=self.delta, token=self.token
            )
        else:
            ident = self.pki.identity(node)
            assert ident is not None
            boot = helpers.downstream_bootstrap(
                as_node or node,
                ident,
                self.pki.trust_bundle,
                self.plan.observability.xds,
                delta=self.delta,
                chain=self.pki.pki.chain,
            )
        if metadata:
            svc = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]
            svc["initial_metadata"] = [{"key": k, "value": v} for k, v in metadata]
        name = name or (f"{node}-as-{as_node}" if as_node else node)
        envoy = start_envoy_here(self.envoy_factory, boot, name)
        self.envoys[name] = envoy
        return envoy

    async def wait_acked(self, node: str, *, within: float = 30) -> None:
        """Wait until a stream of ``node`` has ACKed the current version of every type it holds."""

        def done() -> bool:
            snap = self.cache.get(node)
            if snap is None:
                return False
            kind = "delta" if self.delta else "sotw"
            for st in self.cache.status():
                if st.node != node:
                    continue
                assert st.kind == kind, f"{node} connected {st.kind}, expected {kind}"
                if all(
                    st.acked_version(t) is not None or not rs for t, rs in snap.resources.items()
                ) and _current(st, snap):
                    return True
            return False

        await wait_until_async(done, timeout=within, what=f"node {node} ACKs its snapshot")

    async def wait_envoy_ready(self, name: str, within: float = 30) -> None:
        await trio.to_thread.run_sync(lambda: self.envoys[name].wait_ready(within))

    async def start_ready(self, *nodes: str) -> None:
        """Start the Envoys of ``nodes``; return once each ACKed its snapshot and is ready."""
        for node in nodes:
            await self.start_envoy(node)
        for node in nodes:
            await self.wait_acked(node)
            await self.wait_envoy_ready(node)


def _current(st: Any, snap: Any) -> bool:
    """Every non-empty type's ACKed version is the snapshot's (an Envoy subscribes to all
    of a node's routes and secrets, so the SotW named-subscription version equals it)."""
    return all(st.acked_version(t) == snap.version(t) for t, rs in snap.resources.items() if rs)


@asynccontextmanager
async def xds_world(
    envoy_factory: EnvoyFactory,
    *,
    delta: bool = False,
    clusters: tuple[str, ...] = ("east", "west"),
    alertmanagers: list[model.LocalAlertmanager] | None = None,
    cluster_factory: Callable[[str], model.DownstreamCluster] = helpers.cluster,
    token: str | None = None,
    upstream_connection_seconds: int = 600,
    max_stream_age: float | None = None,
) -> AsyncIterator[World]:
    ca, pki = helpers.make_pki([model.OBSERVABILITY_NODE])
    obs = ObservabilityPorts(
        xds=free_port(),
        thanos=free_port(),
        alertmanager=free_port(),
        prometheus=free_port(),
        address="127.0.0.1",
    )
    registry = CollectorRegistry()
    cache = SnapshotCache(metrics=XdsMetrics(registry))
    ads_tls = ServerTls()
    revoked = RevokedCerts()
    async with trio.open_nursery() as nursery:

        async def serve(port: int, task_status: trio.TaskStatus[int]) -> None:
            stopped = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    world_scopes.append((scope, stopped))
                    await run_ads_server(
                        cache=cache,
                        host="127.0.0.1",
                        port=port,
                        authorizer=Authorizer(forwarder_token=token, revoked=revoked),
                        tls=ads_tls,
                        max_stream_age=max_stream_age,
                        task_status=task_status,
                    )
            finally:
                stopped.set()

        world_scopes: list[tuple[trio.CancelScope, trio.Event]] = []
        ads_port = await nursery.start(serve, 0)
        settings = model.Settings(
            atlasd_ads_host="127.0.0.1",
            atlasd_ads_port=ads_port,
            envoy_ads_address="127.0.0.1",
            envoy_ads_port=obs.xds,
            envoy_address="127.0.0.1",
            envoy_alertmanager_port=obs.alertmanager,
        )
        plan = ListenPlan(observability=obs, local_service_host="127.0.0.1")
        world = World(
            ca=ca,
            pki=pki,
            settings=settings,
            plan=plan,
            builder=SnapshotBuilder(
                plan, forwarder_token=token, upstream_connection_seconds=upstream_connection_seconds
            ),
            token=token,
            cache=cache,
            registry=registry,
            ads_port=ads_port,
            clusters=[],
            alertmanagers=list(alertmanagers or []),
            envoy_factory=envoy_factory,
            delta=delta,
            ads_cert=helpers.ads_server_cert(ca),
            ads_tls=ads_tls,
            revoked=revoked,
        )

        async def restart_server() -> None:
            scope, stopped = world_scopes.pop()
            scope.cancel()
            await stopped.wait()
            await nursery.start(serve, ads_port)

        world.restart_server = restart_server
        for name in clusters:
            world.add_cluster(cluster_factory(name))
        world.publish()
        yield world
        nursery.cancel_scope.cancel()
