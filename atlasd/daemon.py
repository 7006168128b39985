"""``atlasd run``: every subsystem under one Trio nursery, wired by explicit channels.

::

    root nursery                                                          (every replica)
     ├── watchdog  the event loop's batches; what held it when it stalls (`atlasd run` only)
     ├── http      /metrics /healthz /readyz /status /status/stream /status/envoys
     ├── namespace readiness: does atlasd's namespace exist (Kubernetes only)
     ├── sources   an informer per role ──changes──> FleetRunner (owns FleetState + key queue)
     ├── fleet     FleetRunner ──> FleetFeed (immutable versions + changed keys)
     ├── xds       FleetFeed ──> SnapshotBuilder.update ──> SnapshotCache
     ├── ads-tls   FleetFeed ──> ServerTls (the ADS server's certificate and trust)
     ├── ads       the xDS ADS server, reading the SnapshotCache
     ├── enroll    CSRs + join tokens -> certificates (--enroll-listen; optional)
     ├── status    FleetFeed ──> /status parts and gauges, key by key; Envoy streams
     ├── zone      FleetFeed ──> the zone file (+ its ConfigMap mirror while leading)
     ├── endpoints FleetFeed ──> Thanos Query's endpoint files (+ ConfigMaps while leading)
     ├── query     Thanos Query's stores joined with the fleet (--thanos-query-url; optional)
     ├── election  Lease election (or leads at once, alone); for each term:
     │    └── reconcile   FleetFeed ──> key workers ──> writes           (leader only)
     └── heap      the collector's settles (the `atlasd run` process only)

Data flows one way and by key: a watch change is recorded under its key, the fleet derives
that key once, and xDS, DNS, status and reconcile each work on the keys that changed. The
leader writes Kubernetes objects; every replica (the leader too) serves what its own watch
shows, so all replicas agree on what they serve.

The backend (``atlasd.backend``) is a real API server or, in standalone mode, a directory;
it says what it can do (a Lease, the zone's ConfigMap mirror, a namespace check) and
nothing below asks which one it is.

The daemon is the list of its subsystems (``Daemon.subsystems``), each declared as data: a
name, its ``run_x(*, task_status)`` with what it needs bound, whether it is supervised
(``atlasd.supervise``: restarted alone on retriable errors; anything else ends the process,
never half alive), whether it runs only while this replica leads, the readiness part it
completes. They are started in the list's order with ``nursery.start`` (each reports
started only when really ready); the leader-only ones are started by the election for each
term. Adding a subsystem is one entry plus its module. Readiness (``/readyz``) = the caches
have listed, the first fleet has been published, the ADS port is bound (and the namespace
exists); health (``/healthz``) = no subsystem keeps failing (``atlasd.hub``).
"""

from __future__ import annotations

import datetime as dt
import functools
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client import REGISTRY

from atlasd.backend import Backend, BackendSpec
from atlasd.enroll.endpoint import run_enroll
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import roles
from atlasd.fleet.run import FleetRunner
from atlasd.fleet.state import FleetVersion
from atlasd.heap import Heap, export_pauses
from atlasd.http import StatusApp, run_http
from atlasd.hub import StatusHub, StoreProblemDoc
from atlasd.model import ADS_GRPC_PORT, METRICS_PORT, Settings
from atlasd.query.observer import run_query_observer
from atlasd.reconcile.expectations import Expectations
from atlasd.report import EnvoyDocs, envoys_now, run_status
from atlasd.subsystems import (
    Election,
    Leadership,
    run_ads_tls,
    run_election,
    run_endpoints,
    run_heap,
    run_namespace_check,
    run_reconcile,
    run_watchdog,
    run_xds,
    run_zone,
)
from atlasd.supervise import supervise
from atlasd.watch.sources import run_sources
from atlasd.watch.watched import WatchedSet
from atlasd.xds.authz import Authorizer, RevokedCerts
from atlasd.xds.builders import SnapshotBuilder
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.plan import ListenPlan
from atlasd.xds.server import run_ads_server
from atlasd.xds.streams import XdsMetrics
from atlasd.xds.tls import ServerTls


@dataclass(frozen=True)
class DaemonOptions:
    """Everything ``atlasd run`` is configured with (flags and environment)."""

    settings: Settings = field(default_factory=Settings)
    kubeconfig: str | None = None
    context: str | None = None
    # Standalone mode: no Kubernetes, state in this directory.
    store: Path | None = None
    zone_file: Path = Path("atlas.zone")
    # Thanos Query's endpoint configuration files (atlasd.dns.endpoints); None: the
    # directory "thanos-endpoints" beside the zone file.
    endpoints_dir: Path | None = None
    # Thanos Query to observe (atlasd.query; None: off), and how often.
    thanos_query_url: str | None = None
    thanos_query_interval: float = 30.0
    # Where clusters Query does not see are probed (host:port of the observability Envoy's
    # Thanos listener; None: each cluster's sidecar Service, as Query dials it).
    probe_via: str | None = None
    ads_host: str = "0.0.0.0"
    ads_port: int = ADS_GRPC_PORT
    # A downstream node's ADS stream ends at this age (seconds; None: never), so the
    # streams spread over the replicas again after a restart (atlasd.xds.server).
    ads_max_stream_age: float | None = None
    http_host: str = "0.0.0.0"
    http_port: int = METRICS_PORT
    leader_election: bool = True
    lease_name: str = "atlasd"
    # Do not lead while the original Atlas holds one of these locks (atlasd.kube.legacy_lock);
    # serve_only (`atlasd envoy-ads`): never lead.
    legacy_locks: tuple[str, ...] = ()
    serve_only: bool = False
    identity: str = field(default_factory=socket.gethostname)
    allow_loopback: bool = False
    listen_plan: ListenPlan = field(default_factory=ListenPlan)
    # The full pass (a quorum LIST compared with the watch cache): a safety net only.
    resync_seconds: float = 300.0
    store_poll_seconds: float = 0.5
    reconcile_workers: int = 16
    # atlasd.heap: no full collection but scheduled settles (collect, freeze the
    # survivors) once serving and every settle_seconds. A process-wide decision: on for
    # the `atlasd run` process, off for a daemon that shares its process (tests, the demo).
    settle_heap: bool = False
    settle_seconds: float = 10.0
    # atlasd.watchdog: event loop batches over this many seconds are stalls, logged with the
    # code that held the loop (None: no watchdog). Process-wide like settle_heap (its
    # metrics are the process's): on for the `atlasd run` process.
    stall_threshold: float | None = None
    # The enrollment endpoint (atlasd.enroll.endpoint; None: off) and the lifetime of the
    # certificates it signs (renewed by the agents at 2/3 of it).
    enroll_port: int | None = None
    enroll_host: str = "0.0.0.0"
    enroll_lifetime: dt.timedelta = dt.timedelta(days=1)


@dataclass(frozen=True)
class Subsystem:
    """One subsystem: ``run(task_status=...)`` with what it needs already bound."""

    name: str
    run: Callable[..., Awaitable[Any]]
    # Restarted alone, with backoff, on retriable errors (atlasd.supervise).
    supervised: bool = False
    # Runs only while this replica leads (started by the election for each term).
    leader_only: bool = False
    # The readiness part it completes once started.
    ready: str | None = None
    # Told what it reported started with (a bound port).
    started: Callable[[Any], None] | None = None


_XDS_METRICS: list[XdsMetrics] = []


def _xds_metrics() -> XdsMetrics:
    # Registered once per process on the default registry (served on /metrics).
    if not _XDS_METRICS:
        _XDS_METRICS.append(XdsMetrics(REGISTRY))
    return _XDS_METRICS[0]


class Daemon:
    """One atlasd process: build it with options, then ``await run()``.

    Holds the wiring only (the hub, the feed, the cache: what tests and the demo look at);
    each subsystem keeps its state to itself or in the one object that owns it.
    """

    def __init__(self, options: DaemonOptions, *, builder: SnapshotBuilder | None = None) -> None:
        self.options = options
        self.settings = options.settings
        self.hub = StatusHub()
        self.feed = FleetFeed()
        self.cache = SnapshotCache(metrics=_xds_metrics())
        self.app = StatusApp(
            self.hub, envoys=functools.partial(envoys_now, self.cache, EnvoyDocs())
        )
        self.builder = builder or SnapshotBuilder(
            options.listen_plan, forwarder_token=options.settings.forwarder_token
        )
        self.ads_tls = ServerTls()
        # Revoked certificates: kept by the xDS subsystem, read by the ADS authorizer.
        self.revoked = RevokedCerts()
        self.leadership = Leadership(self.hub)
        # The leader's expectations: one object for every term, met by the fleet's relists.
        self.expectations = Expectations()
        self._leader_only: list[Subsystem] = []
        self.http_port: int | None = None
        self.ads_port: int | None = None
        self.enroll_port: int | None = None
        self.heap = Heap() if options.settle_heap else None
        if self.heap is not None:
            export_pauses()

    @property
    def endpoints_dir(self) -> Path:
        """Where Thanos Query's endpoint configuration files are written."""
        o = self.options
        return o.endpoints_dir or o.zone_file.parent / "thanos-endpoints"

    @property
    def fleet(self) -> FleetVersion | None:
        """The latest fleet version (None before the first)."""
        return self.feed.latest

    def _set(self, attr: str) -> Callable[[Any], None]:
        return lambda value: setattr(self, attr, value)

    def subsystems(self, backend: Backend) -> list[Subsystem]:
        """Every subsystem, in start order."""
        o, s, hub, feed, cache = self.options, self.settings, self.hub, self.feed, self.cache
        fleet = FleetRunner(
            s, feed=feed, allow_loopback=o.allow_loopback, expectations=self.expectations
        )
        P = functools.partial
        listen = (o.http_host, o.http_port)
        http = P(run_http, self.app, host=listen[0], port=listen[1])
        subs = [Subsystem("http", http, started=self._set("http_port"))]
        if o.stall_threshold is not None:  # first: it sees the others start
            subs.insert(0, Subsystem("watchdog", P(run_watchdog, threshold=o.stall_threshold,
                                                   hub=hub)))  # fmt: skip
        if backend.namespace_exists is not None:
            check = P(run_namespace_check, check=backend.namespace_exists, namespace=s.namespace)
            subs.append(Subsystem("namespace", P(check, hub=hub)))
        sources = P(run_sources, backend.api, roles(s), namespace=s.namespace, sink=fleet)
        subs += [
            Subsystem("sources", P(sources, on_error=P(self._source_error, backend)),
                      supervised=True, ready="cache"),
            Subsystem("fleet", fleet.run, ready="fleet"),
            Subsystem("xds", P(run_xds, feed=feed, builder=self.builder, cache=cache, hub=hub,
                               revoked=self.revoked)),
            Subsystem("ads-tls", P(run_ads_tls, feed=feed, tls=self.ads_tls)),
            Subsystem("ads", P(run_ads_server, cache=cache, host=o.ads_host, port=o.ads_port,
                               authorizer=Authorizer(forwarder_token=s.forwarder_token,
                                                     revoked=self.revoked),
                               tls=self.ads_tls, max_stream_age=o.ads_max_stream_age),
                      ready="ads", started=self._set("ads_port")),
            Subsystem("status", P(run_status, feed=feed, hub=hub, cache=cache)),
            Subsystem("zone", P(run_zone, feed=feed, path=o.zone_file, settings=s, hub=hub,
                                leadership=self.leadership,
                                mirror=backend.api if backend.configmaps else None),
                      supervised=True),
            Subsystem("endpoints", P(run_endpoints, feed=feed, path=self.endpoints_dir,
                                     settings=s, leadership=self.leadership,
                                     configmaps=backend.api if backend.configmaps else None),
                      supervised=True),
            Subsystem("reconcile", P(run_reconcile, api=backend.api, feed=feed, settings=s,
                                     expectations=self.expectations,
                                     resync_seconds=o.resync_seconds,
                                     workers=o.reconcile_workers, hub=hub,
                                     defer=cache.backlog.busy), leader_only=True),
            Subsystem("election", P(run_election, election=self._election(backend),
                                    lead=self._lead, hub=hub),
                      supervised=not o.serve_only and backend.leases),
        ]  # fmt: skip
        if o.thanos_query_url:
            latest = lambda: feed.latest.model if feed.latest is not None else None  # noqa: E731
            # Where the observability Envoy dials a cluster's Thanos listener.
            thanos_port = lambda c: o.listen_plan.ports_for(c).thanos  # noqa: E731
            subs.append(Subsystem("query", P(run_query_observer, url=o.thanos_query_url,
                                             interval=o.thanos_query_interval, fleet=latest,
                                             hub=hub, probe_via=o.probe_via,
                                             downstream_port=thanos_port)))  # fmt: skip
        if o.enroll_port is not None:
            subs.append(Subsystem("enroll", P(run_enroll, api=backend.api, feed=feed,
                                              tls=self.ads_tls, revoked=self.revoked, settings=s,
                                              host=o.enroll_host, port=o.enroll_port,
                                              lifetime=o.enroll_lifetime),
                                  started=self._set("enroll_port")))  # fmt: skip
        if self.heap is not None:
            subs.append(Subsystem("heap", P(run_heap, heap=self.heap, every=o.settle_seconds)))
        return subs

    def _election(self, backend: Backend) -> Election:
        o = self.options
        return Election(
            api=backend.api,
            namespace=self.settings.namespace,
            identity=o.identity,
            lease_name=o.lease_name,
            use_lease=backend.leases and o.leader_election,
            legacy_locks=o.legacy_locks,
            serve_only=o.serve_only,
        )

    def _source_error(self, backend: Backend, role: WatchedSet, exc: Exception | None) -> None:
        # Before the first list, why the caches are not ready; afterwards the last good
        # view keeps being served (readiness stays: the Envoys need the ADS port).
        if exc is not None and not self.hub.is_ready("cache"):
            self.hub.set_ready("cache", False, reason=f"{role.name}: {exc}")
        if backend.kind == "directory":  # the operator's files: say what is wrong there
            self.hub.publish(store_error=None if exc is None else str(exc))

    def _store_problem(self, file: str, message: str | None) -> None:
        doc = [StoreProblemDoc(file=file, message=message)] if message is not None else None
        self.hub.publish_keyed("store_problems", file, doc)

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        o = self.options
        spec = BackendSpec(
            namespace=self.settings.namespace,
            kubeconfig=o.kubeconfig,
            context=o.context,
            store=o.store,
            store_poll_seconds=o.store_poll_seconds,
        )
        opened = spec.open(on_store_problem=self._store_problem)
        async with opened as backend, trio.open_nursery() as root:
            subs = self.subsystems(backend)
            self._leader_only = [sub for sub in subs if sub.leader_only]
            self.hub.expect_ready(*(sub.ready for sub in subs if sub.ready))
            for sub in subs:
                if not sub.leader_only:
                    await self._start(root, sub)
            task_status.started(self)

    async def _lead(self) -> None:
        """One leadership term: the leader-only subsystems, until cancelled."""
        async with self.leadership.hold(), trio.open_nursery() as nursery:
            for sub in self._leader_only:
                await self._start(nursery, sub)

    async def _start(self, nursery: trio.Nursery, sub: Subsystem) -> None:
        if sub.supervised:
            value = await nursery.start(supervise, sub.name, self.hub, sub.run)
        else:
            value = await nursery.start(sub.run)
        if sub.started is not None:
            sub.started(value)
        if sub.ready is not None:
            self.hub.set_ready(sub.ready, True)
