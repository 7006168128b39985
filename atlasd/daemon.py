"""``atlasd run``: every subsystem under one Trio nursery.

::

    root nursery
     ├── http         /metrics /healthz /readyz /status /status/stream       (every replica)
     ├── source       informers (Kubernetes) or a directory poller (--store)  (every replica)
     ├── ads          the xDS ADS server                                      (every replica)
     ├── fleet        watch cache -> observed fleet -> xDS snapshots + zone   (every replica)
     ├── zone         the zone file (+ its ConfigMap mirror while leading)    (every replica)
     ├── status       Envoy stream status -> /status                          (every replica)
     └── election     Lease; while leading: the reconcile loop (writes)       (leader only)

Data flows one way: the leader's reconcile loop writes Kubernetes objects; every replica
(the leader too) serves what its own watch cache holds (``atlasd.reconcile.observed``),
so all replicas agree on what they serve.

Subsystems are started in dependency order with ``nursery.start`` and report started
only when really ready. A subsystem failing with a retriable error (the Kubernetes API
unreachable, a file system hiccup) is restarted with backoff inside its own cancel
scope, and reported in ``/status``; any other exception ends the process with a non-zero
exit (never half alive). Readiness (``/readyz``) = the caches have listed, the ADS port
is bound and the first fleet has been published.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from atlasd.dns.writer import Zone, run_zone_writer
from atlasd.http import StatusApp, run_http
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import Conflict, KubeError
from atlasd.kube.events import post_event
from atlasd.kube.lease import run_leader_election
from atlasd.kube.legacy_lock import LeadershipGate
from atlasd.kube.resources import SECRETS, SERVICES
from atlasd.model import Fleet, Problem, Settings
from atlasd.reconcile.applier import Reconciler, ReconcileResult
from atlasd.reconcile.observed import ObservedFleet, observed_fleet
from atlasd.standalone import FileStore
from atlasd.status import StatusHub
from atlasd.watch.informer import Informer, strip_managed_fields
from atlasd.xds.authz import Authorizer
from atlasd.xds.builders import SnapshotBuilder
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.plan import ListenPlan
from atlasd.xds.server import run_ads_server
from atlasd.xds.snapshot import Snapshot
from atlasd.xds.status import XdsMetrics

log = logging.getLogger(__name__)

RETRIABLE: tuple[type[Exception], ...] = (KubeError, OSError)

RECONCILE_SECONDS = Histogram(
    "atlasd_reconcile_duration_seconds", "Duration of one reconcile pass (leader)."
)
RECONCILE_WRITES = Counter("atlasd_reconcile_writes_total", "Object writes made by reconcile.")
RECONCILE_ERRORS = Counter("atlasd_reconcile_errors_total", "Reconcile passes that failed.")
PROBLEMS = Gauge("atlasd_invalid_clusters", "Cluster Services rejected by validation.")
CLUSTERS = Gauge("atlasd_clusters", "Downstream clusters being served.")
LEADER = Gauge("atlasd_leader", "1 while this replica holds the Lease.")
CERT_EXPIRY = Gauge(
    "atlasd_certificate_expiry_timestamp_seconds",
    "notAfter of each certificate atlasd serves (unix time).",
    ["name"],
)
FLEET_SECONDS = Histogram(
    "atlasd_fleet_publish_duration_seconds",
    "Watch change to xDS snapshots published (build + publish).",
)


@dataclass(frozen=True)
class DaemonOptions:
    """Everything ``atlasd run`` is configured with (flags and environment)."""

    settings: Settings = field(default_factory=Settings)
    kubeconfig: str | None = None
    context: str | None = None
    # Standalone mode: no Kubernetes, state in this directory.
    store: Path | None = None
    zone_file: Path = Path("atlas.zone")
    ads_host: str = "0.0.0.0"
    ads_port: int = 6305
    http_host: str = "0.0.0.0"
    http_port: int = 6309
    leader_election: bool = True
    lease_name: str = "atlasd"
    # Do not lead while the original Atlas holds one of these locks (atlasd.kube.legacy_lock);
    # serve_only (`atlasd envoy-ads`): never lead.
    legacy_locks: tuple[str, ...] = ()
    serve_only: bool = False
    identity: str = field(default_factory=socket.gethostname)
    allow_loopback: bool = False
    listen_plan: ListenPlan = field(default_factory=ListenPlan)
    resync_seconds: float = 60.0
    store_poll_seconds: float = 0.5


class Observed:
    """The replica's watch cache of Services and Secrets, with change notification.

    Invariant: ``generation`` grows on every change; ``_changed`` is set (and replaced)
    exactly when it grows.
    """

    def __init__(self) -> None:
        self.services: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
        self.secrets: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
        self.generation = 0
        self._changed = trio.Event()

    def bump(self, *_: object) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, seen: int) -> int:
        while self.generation <= seen:
            await self._changed.wait()
        return self.generation


async def _supervise(
    name: str,
    hub: StatusHub,
    fn: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn(task_status=...)`` forever, restarting it with backoff on retriable errors.

    Each run lives in its own nursery (a cancel scope), so a restart tears down
    everything the subsystem started. ``task_status.started()`` is passed through on
    the first run only.
    """
    delay = 0.5
    first = True
    while True:
        started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                if first:
                    await nursery.start(fn)
                    task_status.started()
                    first = False
                else:
                    nursery.start_soon(fn)
                hub.subsystem(name, "running")
        except RETRIABLE as exc:
            failure: BaseException = exc
        except BaseExceptionGroup as group:
            # Nurseries wrap errors in groups: restart only if every leaf is retriable
            # (a Cancelled or a bug among them propagates unchanged).
            retriable, rest = group.split(RETRIABLE)
            if rest is not None or retriable is None:
                raise
            failure = _first_leaf(retriable)
        else:
            return
        if trio.current_time() - started_at > 120:
            delay = 0.5
        log.warning(
            "%s failed (%s: %s); restarting in %.1fs", name, type(failure).__name__, failure, delay
        )
        hub.subsystem(name, f"restarting: {type(failure).__name__}: {failure}")
        await trio.sleep(delay * (1 + random.random() / 2))
        delay = min(delay * 2, 30.0)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _cert_not_after(pem: bytes) -> float | None:
    try:
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    except ValueError:
        return None


def _problem_doc(p: Problem) -> dict[str, str]:
    return {
        "object": f"{p.source.kind}/{p.source.name}",
        "field": p.field,
        "message": p.message,
        "reason": p.reason,
    }


def fleet_status(observed: ObservedFleet) -> dict[str, Any]:
    """The ``clusters``, ``pending``, ``problems`` and ``certificates`` parts of /status."""
    fleet = observed.fleet
    certs: list[dict[str, Any]] = []
    expiry_by_node: dict[str, float | None] = {}
    if fleet.pki is not None:
        ca_after = _cert_not_after(fleet.pki.ca.cert_pem)
        certs.append({"name": "ca", "serial": fleet.pki.ca_serial, "not_after": ca_after})
        for node, ident in fleet.pki.identities:
            for kind, ck in (("server", ident.server), ("client", ident.client)):
                after = _cert_not_after(ck.cert_pem)
                certs.append({"name": f"{node}/{kind}", "not_after": after})
                if after is not None:
                    prev = expiry_by_node.get(node)
                    expiry_by_node[node] = after if prev is None else min(prev, after)
    clusters = [
        {
            "name": c.name,
            "external_ip": c.external_ip,
            "replicas": c.replicas,
            "dns_group": c.dns_group,
            "sidecars": list(c.sidecar_services()),
            "certificate_expiry": expiry_by_node.get(c.name),
        }
        for c in fleet.clusters
    ]
    return {
        "clusters": clusters,
        "pending": list(observed.pending),
        "problems": [_problem_doc(p) for p in observed.problems],
        "certificates": certs,
    }


def _envoy_doc(status: Any) -> dict[str, Any]:
    doc = asdict(status)
    doc["acked"] = dict(status.acked)
    return doc


class Daemon:
    """One atlasd process: build it with options, then ``await run()``."""

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.settings = options.settings
        self.hub = StatusHub()
        self.app = StatusApp(self.hub)
        self.observed = Observed()
        self.cache = SnapshotCache(metrics=_xds_metrics())
        self.builder = SnapshotBuilder(
            options.listen_plan, forwarder_token=options.settings.forwarder_token
        )
        self.authorizer = Authorizer(forwarder_token=options.settings.forwarder_token)
        self.leading = False
        self._leading_changed = trio.Event()
        self.last_fleet: ObservedFleet | None = None
        # Label values of CERT_EXPIRY this daemon exported (to remove stale ones).
        self._expiry_names: set[str] = set()
        self.last_zone: Zone | None = None
        self.http_port: int | None = None
        self.ads_port: int | None = None
        # Fleets for the zone writer: newest wins (the writer coalesces the backlog).
        self._zone_send, self._zone_recv = trio.open_memory_channel[Fleet](64)

    # -- entry point -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        opts = self.options
        hub = self.hub
        hub.expect_ready("cache", "ads", "fleet")
        kube: Any
        if opts.store is not None:
            kube = FileStore(opts.store, namespace=self.settings.namespace)
        else:
            kube = KubeClient(load_config(opts.kubeconfig, opts.context))
        async with kube, trio.open_nursery() as root:
            self.http_port = await root.start(_run_http, self.app, opts.http_host, opts.http_port)
            if opts.store is not None:
                await root.start(self._poll_store, kube)
            else:
                await root.start(
                    _supervise, "informers", hub, functools.partial(self._informers, kube)
                )
            hub.set_ready("cache", True)
            self.ads_port = await root.start(
                _run_ads, self.cache, opts.ads_host, opts.ads_port, self.authorizer
            )
            hub.set_ready("ads", True)
            root.start_soon(self._status_loop)
            await root.start(self._fleet_loop)
            root.start_soon(
                functools.partial(_supervise, "zone", hub, functools.partial(self._zone_loop, kube))
            )
            if opts.store is not None or not opts.leader_election:
                root.start_soon(self._lead, kube)
            else:
                root.start_soon(
                    functools.partial(
                        _supervise, "election", hub, functools.partial(self._election, kube)
                    )
                )
            task_status.started(self)
        # Only reached when every task ended (they do not, unless cancelled).

    # -- sources -----------------------------------------------------------------------

    async def _informers(
        self, kube: KubeClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        ns = self.settings.namespace
        # These caches feed only the pure fleet functions (reconcile LISTs for itself), so
        # managedFields, about half of each object's size, are dropped.
        services = Informer(kube, SERVICES, namespace=ns, transform=strip_managed_fields)
        secrets = Informer(kube, SECRETS, namespace=ns, transform=strip_managed_fields)
        services.subscribe(self.observed.bump)
        secrets.subscribe(self.observed.bump)
        async with trio.open_nursery() as nursery:
            await nursery.start(services.run)
            await nursery.start(secrets.run)
            self.observed.services = services.items
            self.observed.secrets = secrets.items
            self.observed.bump()
            task_status.started()

    async def _poll_store(
        self, store: FileStore, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cache: dict[str, dict[str, Mapping[str, Any]]] = {"services": {}, "secrets": {}}
        self.observed.services = lambda: cache["services"]
        self.observed.secrets = lambda: cache["secrets"]
        fingerprint: object = None
        started = False
        while True:
            current = store.fingerprint()
            if current != fingerprint:
                fingerprint = current
                try:
                    services, _ = await store.list(SERVICES)
                    secrets, _ = await store.list(SECRETS)
                except KubeError as exc:
                    # A malformed manifest: keep serving the last good view.
                    log.error("standalone store: %s", exc)
                    self.hub.publish(store_error=str(exc))
                else:
                    self.hub.publish(store_error=None)
                    cache["services"] = {s["metadata"]["name"]: s for s in services}
                    cache["secrets"] = {s["metadata"]["name"]: s for s in secrets}
                    self.observed.bump()
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.options.store_poll_seconds)

    # -- every replica: serve what the cache holds -------------------------------------

    async def _fleet_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        seen = -1
        started = False
        while True:
            seen = await self.observed.wait_changed(seen)
            # Let a burst of watch events land before building (they coalesce).
            await trio.sleep(0.02)
            seen = self.observed.generation
            t0 = time.perf_counter()
            services = list(self.observed.services().values())
            secrets = dict(self.observed.secrets())
            # Validation, certificate parsing and the snapshot build are pure and can take
            # seconds for thousands of clusters: run them off the Trio thread so the ADS
            # server keeps answering. One build at a time (this loop); publishing stays here.
            obs, snapshots = await trio.to_thread.run_sync(
                functools.partial(self._build, services, secrets)
            )
            changed = self.cache.publish(snapshots)
            FLEET_SECONDS.observe(time.perf_counter() - t0)
            if changed:
                log.info("xds: published snapshots for %s", ", ".join(sorted(changed)))
            self.last_fleet = obs
            # When the writer is behind, drop: it renders only the newest fleet anyway.
            with contextlib.suppress(trio.WouldBlock):
                self._zone_send.send_nowait(obs.fleet)
            CLUSTERS.set(len(obs.fleet.clusters))
            PROBLEMS.set(len(obs.problems))
            status = fleet_status(obs)
            # Snapshots the builder refused as inconsistent (a bug; the node keeps its last
            # good snapshot): shown so they are not silent.
            status["xds_problems"] = list(self.builder.problems)
            self._export_expiry(status["certificates"])
            self.hub.publish(**status)
            if not started:
                started = True
                self.hub.set_ready("fleet", True)
                task_status.started()

    def _export_expiry(self, certs: list[dict[str, Any]]) -> None:
        """One gauge child per certificate served now; removed clusters' children go."""
        current = {c["name"]: c["not_after"] for c in certs if c["not_after"] is not None}
        for name in self._expiry_names - current.keys():
            CERT_EXPIRY.remove(name)
        for name, not_after in current.items():
            CERT_EXPIRY.labels(name).set(not_after)
        self._expiry_names = set(current)

    def _build(
        self, services: list[Mapping[str, Any]], secrets: dict[str, Mapping[str, Any]]
    ) -> tuple[ObservedFleet, dict[str, Snapshot]]:
        obs = observed_fleet(
            services=services,
            secrets=secrets,
            settings=self.settings,
            now=dt.datetime.now(dt.UTC),
            allow_loopback=self.options.allow_loopback,
        )
        return obs, self.builder.build(obs.fleet)

    async def _zone_loop(
        self, kube: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The zone writer; restarted with the ConfigMap mirror while this replica leads."""
        task_status.started()

        def on_zone(zone: Zone) -> None:
            self.last_zone = zone
            self.hub.publish(zone={"serial": zone.serial, "records": len(zone.records)})

        while True:
            leading = self.leading
            changed = self._leading_changed
            mirror = kube if (leading and self.options.store is None) else None
            send, recv = trio.open_memory_channel[Fleet](64)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_fleets, send)
                await nursery.start(
                    functools.partial(
                        run_zone_writer,
                        fleets=recv,
                        path=self.options.zone_file,
                        kube=mirror,
                        settings=self.settings,
                        on_zone=on_zone,
                    )
                )
                if self.last_fleet is not None:
                    await send.send(self.last_fleet.fleet)
                await changed.wait()
                nursery.cancel_scope.cancel()

    async def _forward_fleets(self, send: trio.MemorySendChannel[Fleet]) -> None:
        async with send:
            async for fleet in self._zone_recv:
                await send.send(fleet)

    async def _status_loop(self) -> None:
        last: object = None
        while True:
            envoys = [_envoy_doc(s) for s in self.cache.status()]
            if envoys != last:
                last = envoys
                self.hub.publish(envoys=envoys)
            await trio.sleep(0.5)

    # -- the leader: write ------------------------------------------------------------

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        LEADER.set(1 if leading else 0)
        self.hub.publish(leader=leading)
        self._leading_changed.set()
        self._leading_changed = trio.Event()

    async def _election(
        self, kube: KubeClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        gate = LeadershipGate(
            kube,
            namespace=self.settings.namespace,
            identity=self.options.identity,
            legacy_locks=self.options.legacy_locks,
            own_lease=self.options.lease_name,
            serve_only=self.options.serve_only,
            on_change=lambda doc: self.hub.publish(leadership=dict(doc)),
        )
        await run_leader_election(
            kube,
            name=self.options.lease_name,
            namespace=self.settings.namespace,
            identity=self.options.identity,
            on_leading=lambda: self._lead(kube),
            gate=gate,
        )

    async def _lead(self, kube: Any) -> None:
        self._set_leading(True)
        try:
            await _supervise("reconcile", self.hub, functools.partial(self._reconcile_loop, kube))
        finally:
            self._set_leading(False)

    async def _reconcile_loop(
        self, kube: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Each pass LISTs (a quorum read) rather than trusting the watch cache: a cache that
        # lags our own writes would make the next pass re-issue certificates it just wrote.
        reconciler = Reconciler(
            settings=self.settings,
            allow_loopback=self.options.allow_loopback,
            post_event=post_event,
        )
        task_status.started()
        seen = -1
        wait = 0.0
        while True:
            with trio.move_on_after(wait):
                await self.observed.wait_changed(seen)
            seen = self.observed.generation
            t0 = time.perf_counter()
            try:
                result = await reconciler.reconcile_once(kube, now=dt.datetime.now(dt.UTC))
            except Conflict:
                RECONCILE_ERRORS.inc()
                seen = -1  # something changed under us: pass again at once
                continue
            RECONCILE_SECONDS.observe(time.perf_counter() - t0)
            RECONCILE_WRITES.inc(result.writes)
            # Pass again on the next change, at the periodic resync, or when a certificate
            # is due for renewal, whichever comes first.
            wait = self.options.resync_seconds
            if result.next_renewal is not None:
                due = (result.next_renewal - dt.datetime.now(dt.UTC)).total_seconds()
                wait = max(1.0, min(wait, due))
            self.hub.publish(last_reconcile=_result_doc(result, time.perf_counter() - t0))


def _result_doc(result: ReconcileResult, seconds: float) -> dict[str, Any]:
    return {
        "at": time.time(),
        "seconds": round(seconds, 4),
        "writes": result.writes,
        "events": result.events,
        "issued": list(result.issued),
        "ca_action": result.ca_action,
        "problems": len(result.problems),
        "write_errors": list(result.write_errors),
    }


_METRICS: XdsMetrics | None = None


def _xds_metrics() -> XdsMetrics:
    # Registered once per process on the default registry (served on /metrics).
    global _METRICS
    if _METRICS is None:
        _METRICS = XdsMetrics(REGISTRY)
    return _METRICS


async def _run_http(
    app: StatusApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await run_http(app, host=host, port=port, task_status=task_status)


async def _run_ads(
    cache: SnapshotCache,
    host: str,
    port: int,
    authorizer: Authorizer,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await run_ads_server(
        cache=cache, host=host, port=port, authorizer=authorizer, task_status=task_status
    )
