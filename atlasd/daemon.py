"""``atlasd run``: every subsystem under one Trio nursery, wired by explicit channels.

::

    root nursery                                                          (every replica)
     ├── http      /metrics /healthz /readyz /status /status/stream
     ├── sources   an informer per role ──changes──> FleetState + key queue
     ├── fleet     key queue ──> FleetFeed (immutable versions + changed keys)
     ├── ads       the xDS ADS server, reading the SnapshotCache; its TLS certificate
     │             follows the fleet (FleetFeed ──> ServerTls)
     ├── xds       FleetFeed ──> SnapshotBuilder.update ──> SnapshotCache
     ├── zone      FleetFeed ──> the zone file (+ its ConfigMap mirror while leading)
     ├── status    FleetFeed ──> /status parts and gauges, key by key; Envoy streams
     └── leading   Lease election; while leading: reconcile (FleetFeed ──> key workers ──> writes)

Data flows one way and by key: a watch change is recorded under its key, the fleet derives
that key once, and xDS, DNS, status and reconcile each work on the keys that changed. The
leader writes Kubernetes objects; every replica (the leader too) serves what its own watch
shows, so all replicas agree on what they serve.

The backend is a ``KubeApi``: a real API server (``KubeClient``: Lease election, Events,
the zone's ConfigMap mirror while leading) or, in standalone mode, a directory
(``FileStore``: always leading, no mirror). The sources and everything after them do not
know which.

Subsystems are started in dependency order with ``nursery.start`` and report started only
when really ready. A subsystem failing with a retriable error (the Kubernetes API
unreachable, a file system hiccup) is restarted with backoff inside its own cancel scope,
and reported in ``/status``; any other exception ends the process with a non-zero exit
(never half alive). Readiness (``/readyz``) = the caches have listed, the ADS port is bound
and the first fleet has been published.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client import REGISTRY

from atlasd import metrics
from atlasd.dns.writer import Zone, ZoneUpdate, run_zone_writer
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY, roles
from atlasd.fleet.run import FleetSink, run_fleet
from atlasd.fleet.state import CertInfo, FleetState, FleetVersion, Member
from atlasd.heap import Heap, export_pauses
from atlasd.http import StatusApp, run_http
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import KubeError
from atlasd.kube.events import post_event
from atlasd.kube.lease import run_leader_election
from atlasd.kube.legacy_lock import LeadershipGate
from atlasd.model import ADS_GRPC_PORT, METRICS_PORT, Problem, Settings
from atlasd.pacing import burst_pause, cpu_timed
from atlasd.reconcile.applier import KeyResult, Reconciler
from atlasd.reconcile.loop import ReconcileLoop
from atlasd.status import StatusHub
from atlasd.watch.backoff import Backoff
from atlasd.watch.role import Role
from atlasd.watch.sources import run_sources
from atlasd.watch.workqueue import WorkQueue
from atlasd.xds.authz import Authorizer
from atlasd.xds.builders import SnapshotBuilder
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.plan import ListenPlan
from atlasd.xds.server import run_ads_server
from atlasd.xds.snapshot import SHORT_NAMES
from atlasd.xds.status import XdsMetrics
from atlasd.xds.tls import ServerTls, TlsMaterial

log = logging.getLogger(__name__)

# What restarts a subsystem: any Kubernetes failure (kube.errors: a loop that starts over
# retries every KubeError) or a file system one (standalone's store, the zone file).
RESTARTS: tuple[type[Exception], ...] = (KubeError, OSError)


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
    ads_port: int = ADS_GRPC_PORT
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


# -- supervision ------------------------------------------------------------------------------


async def supervise(
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
    # Starts over after a run that lasted two minutes (below), not after a quiet while.
    backoff = Backoff(initial=0.5, jitter=0.5, reset_after=float("inf"))
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
        except RESTARTS as exc:
            failure: BaseException = exc
        except BaseExceptionGroup as group:
            # Nurseries wrap errors in groups: restart only if every leaf is retriable
            # (a Cancelled or a bug among them propagates unchanged).
            retriable, rest = group.split(RESTARTS)
            if rest is not None or retriable is None:
                raise
            failure = _first_leaf(retriable)
        else:
            return
        if trio.current_time() - started_at > 120:
            backoff.reset()
        delay = backoff.next_delay(trio.current_time())
        log.warning(
            "%s failed (%s: %s); restarting in %.1fs", name, type(failure).__name__, failure, delay
        )
        hub.subsystem(name, f"restarting: {type(failure).__name__}: {failure}")
        await trio.sleep(delay)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Leadership:
    """Whether this replica leads, observable: ``wait_changed`` wakes on every change."""

    def __init__(self) -> None:
        self.leading = False
        self._changed = trio.Event()

    def set(self, leading: bool, hub: StatusHub) -> None:
        self.leading = leading
        metrics.LEADER.set(1 if leading else 0)
        hub.publish(leader=leading)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


# -- the subsystems ---------------------------------------------------------------------------


async def run_xds(
    *,
    feed: FleetFeed,
    builder: SnapshotBuilder,
    cache: SnapshotCache,
    hub: StatusHub,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fleet versions -> snapshots of the nodes they touch -> the cache the ADS server reads.

    A lone change goes out at once. In a burst (thousands of clusters arriving) each
    build is followed by a pause (``atlasd.pacing``) so that building takes at most a
    quarter of the process (each pause at most 1 s) while the changes in between coalesce
    into the next build. The Envoys set their own pace: a stream sends a node's next change
    only once its Envoy has answered the previous one (``atlasd.xds.protocol``, one round at
    a time), so an Envoy is never flooded whatever the rate of builds.
    """
    sub = feed.subscribe()
    started = False
    async for update in sub:
        build = functools.partial(builder.update, update.version.model, update.changed)
        # A start or a CA rotation touches every node: let the ADS server answer meanwhile.
        if len(update.changed) > 200:
            result, cpu = await trio.to_thread.run_sync(cpu_timed, build)
        else:
            result, cpu = cpu_timed(build)
        changed, spent = cpu_timed(functools.partial(cache.update, result.changed))
        if changed and len(changed) <= 20:
            log.debug("xds: published snapshots for %s", ", ".join(sorted(changed)))
        elif changed:
            log.info("xds: published snapshots for %d nodes", len(changed))
        if builder.problems:
            # Snapshots the builder refused as inconsistent (a bug; the node keeps its last
            # good snapshot): shown so they are not silent.
            hub.publish(xds_problems=list(builder.problems))
        if not started:
            started = True
            task_status.started()
        await trio.sleep(burst_pause(cpu + spent, share=0.25, cap=1.0))


async def run_ads_tls(
    *,
    feed: FleetFeed,
    tls: ServerTls,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fleet versions -> the ADS server's TLS: atlasd's ADS certificate (``atlasd-ads``),
    the cross-signed chain and the trust bundle of the stored CA. A renewed or re-issued
    certificate serves the next handshake; nothing restarts."""
    sub = feed.subscribe()
    if feed.latest is not None:
        tls.update(_tls_material(feed.latest))
    task_status.started()
    async for update in sub:
        if FLEET_KEY in update.changed:
            tls.update(_tls_material(update.version))


def _tls_material(version: FleetVersion) -> TlsMaterial | None:
    fw = version.fleetwide
    if fw.ads_server is None or fw.ca is None:
        return None
    return TlsMaterial(cert=fw.ads_server, chain=fw.ca.chain, trust=fw.ca.bundle)


async def run_zone(
    *,
    feed: FleetFeed,
    path: Path,
    settings: Settings,
    hub: StatusHub,
    leadership: Leadership,
    mirror: KubeApi | None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The zone writer; restarted with the ConfigMap mirror while this replica leads."""
    task_status.started()

    def on_zone(zone: Zone) -> None:
        hub.publish(zone={"serial": zone.serial, "records": zone.count})

    while True:
        leading = leadership.leading
        send, recv = trio.open_memory_channel[Any](64)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    run_zone_writer,
                    fleets=recv,
                    path=path,
                    kube=mirror if leading else None,
                    settings=settings,
                    on_zone=on_zone,
                )
            )

            async def forward(send: trio.MemorySendChannel[Any] = send) -> None:
                async with send:
                    async for update in feed.subscribe():
                        await send.send(ZoneUpdate(update.version.model, update.changed))

            nursery.start_soon(forward)
            await leadership.wait_changed()
            nursery.cancel_scope.cancel()


async def run_heap(
    *, heap: Heap, every: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Take the full collections over, settle the heap now (the daemon has its first
    fleet served) and every ``every`` s."""
    heap.take_over()
    try:
        heap.settle("serving")
        task_status.started()
        while True:
            await trio.sleep(every)
            heap.settle("timer")
    finally:
        heap.release()


async def run_namespace_check(
    *,
    check: Callable[[str], Awaitable[bool]],
    namespace: str,
    hub: StatusHub,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Readiness that never lies: a namespace that does not exist lists as empty, so
    nothing else would notice. Until it exists, not ready (with the reason in /status and
    /readyz), checked again with backoff and logged once per check. Once it exists, done:
    its deletion later shows as failing writes and watches."""
    task_status.started()
    backoff = Backoff(initial=2.0, cap=60.0, jitter=0.0, reset_after=float("inf"))
    while True:
        try:
            exists = await check(namespace)
            reason = f"namespace {namespace!r} does not exist"
        except KubeError as exc:
            exists, reason = False, f"cannot tell whether namespace {namespace!r} exists: {exc}"
        if exists:
            hub.set_ready("namespace", True)
            return
        hub.set_ready("namespace", False, reason=reason)
        delay = backoff.next_delay(trio.current_time())
        log.warning("not ready: %s (checked again in %.0fs)", reason, delay)
        await trio.sleep(delay)


def _problem_doc(p: Problem) -> dict[str, str]:
    return {
        "object": f"{p.source.kind}/{p.source.name}",
        "field": p.field,
        "message": p.brief(),
        "reason": p.reason,
    }


def _cert_docs(certs: tuple[CertInfo, ...], serial: str | None = None) -> list[dict[str, Any]]:
    out = []
    for c in certs:
        doc: dict[str, Any] = {"name": c.name, "not_after": c.not_after}
        if c.name == "ca" and serial is not None:
            doc["serial"] = serial
        out.append(doc)
    return out


class FleetReport:
    """/status parts and gauges, kept key by key (a change of one cluster costs that
    cluster). Invariants: ``_states[key]`` is the state last reported for ``key``;
    ``_certs[key]`` the certificate names it exported."""

    def __init__(self, hub: StatusHub) -> None:
        self.hub = hub
        self._states: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._certs: dict[str, set[str]] = {}
        self._exported: dict[str, tuple[CertInfo, ...]] = {}

    def update(self, version: FleetVersion, keys: frozenset[str]) -> None:
        hub = self.hub
        for key in keys:
            if key == FLEET_KEY:
                fw = version.fleetwide
                serial = fw.ca.serial if fw.ca is not None else None
                hub.publish_keyed("certificates", "", _cert_docs(fw.certificates, serial))
                hub.publish_keyed("problems", "", [_problem_doc(p) for p in fw.problems])
                self._export(key, fw.certificates)
                continue
            m = version.members.get(key)
            self._member(key, m)
        metrics.CLUSTERS.set(self._counts.get("served", 0))
        metrics.PENDING.set(self._counts.get("pending", 0))
        metrics.INVALID.set(self._counts.get("invalid", 0))

    def _set_state(self, key: str, state: str | None) -> None:
        old = self._states.pop(key, None)
        if old is not None:
            self._counts[old] -= 1
        if state is not None:
            self._states[key] = state
            self._counts[state] = self._counts.get(state, 0) + 1

    def _member(self, key: str, m: Member | None) -> None:
        hub = self.hub
        if m is None:
            self._set_state(key, None)
            for section in ("clusters", "pending", "problems", "certificates"):
                hub.publish_keyed(section, key, None)
            self._export(key, ())
            return
        state = m.state
        if state == "absent" and m.problems:
            state = "invalid"  # a Service whose cluster label is not exactly "true"
        self._set_state(key, state)
        served = m.state == "served" and m.cluster is not None
        certs = m.certificates if served else ()
        c = m.cluster
        expiry = [x.not_after for x in certs if x.not_after is not None]
        hub.publish_keyed(
            "clusters",
            key,
            [
                {
                    "name": c.name,
                    "external_ip": c.external_ip,
                    "replicas": c.replicas,
                    "dns_group": c.dns_group,
                    "sidecars": list(c.sidecar_services()),
                    "certificate_expiry": min(expiry) if expiry else None,
                }
            ]
            if served and c is not None
            else None,
        )
        hub.publish_keyed("pending", key, [key] if m.state == "pending" else None)
        hub.publish_keyed("problems", key, [_problem_doc(p) for p in m.problems])
        hub.publish_keyed("certificates", key, _cert_docs(certs))
        self._export(key, certs)

    def _export(self, key: str, certs: tuple[CertInfo, ...]) -> None:
        if self._exported.get(key) == certs:
            return
        if certs:
            self._exported[key] = certs
        else:
            self._exported.pop(key, None)
        names = set()
        for c in certs:
            if c.not_after is not None:
                metrics.CERT_EXPIRY.labels(c.name).set(c.not_after)
            if c.renew_at is not None:
                metrics.CERT_RENEWAL.labels(c.name).set(c.renew_at)
            names.add(c.name)
        for gone in self._certs.get(key, set()) - names:
            for gauge in (metrics.CERT_EXPIRY, metrics.CERT_RENEWAL):
                with suppress(KeyError):
                    gauge.remove(gone)
        if names:
            self._certs[key] = names
        else:
            self._certs.pop(key, None)


async def run_status(
    *,
    feed: FleetFeed,
    hub: StatusHub,
    cache: SnapshotCache,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fleet versions -> /status parts and gauges; Envoy streams -> /status ``envoys``
    (woken by the streams' changes, published at most twice a second; nothing while idle)."""
    report = FleetReport(hub)
    task_status.started()
    wake = trio.Event()
    wake.set()  # publish the first (empty) list at once

    def changed() -> None:
        wake.set()

    cache.board.on_change = changed

    async def envoys() -> None:
        nonlocal wake
        last: object = None
        while True:
            await wake.wait()
            wake = trio.Event()
            docs = [_envoy_doc(s) for s in cache.status()]
            if docs != last:
                last = docs
                hub.publish(envoys=docs)
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(envoys)
        async for update in feed.subscribe():
            report.update(update.version, update.changed)


def _envoy_doc(status: Any) -> dict[str, Any]:
    doc = asdict(status)
    doc["acked"] = dict(status.acked)
    doc["acked_at"] = dict(status.acked_at)
    return doc


def envoys_now(cache: SnapshotCache) -> dict[str, Any]:
    """``/status/envoys``: every open ADS stream, for each node streaming the versions it
    should be at (its current snapshot), and how many nodes have a snapshot. Read at request
    time; small whatever the fleet's size (benchmarks poll it)."""
    docs = [_envoy_doc(s) for s in cache.status()]
    snapshots = {}
    for node in {d["node"] for d in docs}:
        snap = cache.get(node)
        if snap is not None:
            snapshots[node] = {
                SHORT_NAMES.get(t, t): v for t, v in snap.versions.items() if snap.of_type(t)
            }
    return {"envoys": docs, "snapshots": snapshots, "nodes": len(cache)}


def _result_doc(result: KeyResult, seconds: float) -> dict[str, Any]:
    return {
        "at": time.time(),
        "key": result.key,
        "seconds": round(seconds, 4),
        "writes": result.writes,
        "events": result.events,
        "issued": list(result.issued),
        "ca_action": result.ca_action,
        "problems": len(result.problems),
        "write_errors": list(result.write_errors),
    }


# -- the daemon ---------------------------------------------------------------------------------


_METRICS: XdsMetrics | None = None


def _xds_metrics() -> XdsMetrics:
    # Registered once per process on the default registry (served on /metrics).
    global _METRICS
    if _METRICS is None:
        _METRICS = XdsMetrics(REGISTRY)
    return _METRICS


class Daemon:
    """One atlasd process: build it with options, then ``await run()``.

    Holds the wiring only (the hub, the feed, the cache: what tests and the demo look at);
    the subsystems keep their state to themselves.
    """

    def __init__(self, options: DaemonOptions, *, builder: SnapshotBuilder | None = None) -> None:
        self.options = options
        self.settings = options.settings
        self.hub = StatusHub()
        self.feed = FleetFeed()
        self.cache = SnapshotCache(metrics=_xds_metrics())
        self.app = StatusApp(self.hub, envoys=functools.partial(envoys_now, self.cache))
        self.builder = builder or SnapshotBuilder(
            options.listen_plan, forwarder_token=options.settings.forwarder_token
        )
        self.ads_tls = ServerTls()
        self.http_port: int | None = None
        self.ads_port: int | None = None
        self.heap = Heap() if options.settle_heap else None
        if self.heap is not None:
            export_pauses()

    @property
    def fleet(self) -> FleetVersion | None:
        """The latest fleet version (None before the first)."""
        return self.feed.latest

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        opts = self.options
        hub = self.hub
        hub.expect_ready("cache", "ads", "fleet")
        standalone = opts.store is not None
        namespace_check: Callable[[str], Awaitable[bool]] | None = None
        async with AsyncExitStack() as stack:
            api: KubeApi
            if opts.store is not None:
                from atlasd.standalone import FileStore

                api = FileStore(
                    opts.store,
                    namespace=self.settings.namespace,
                    poll_seconds=opts.store_poll_seconds,
                )
            else:
                from atlasd.kube.client import KubeClient
                from atlasd.kube.config import load_config

                client = await stack.enter_async_context(
                    KubeClient(load_config(opts.kubeconfig, opts.context))
                )
                api = client
                namespace_check = client.namespace_exists
            await self._run(
                api,
                standalone=standalone,
                namespace_check=namespace_check,
                task_status=task_status,
            )

    async def _run(
        self,
        api: KubeApi,
        *,
        standalone: bool,
        namespace_check: Callable[[str], Awaitable[bool]] | None,
        task_status: trio.TaskStatus[Daemon],
    ) -> None:
        opts = self.options
        hub = self.hub
        settings = self.settings
        leadership = Leadership()
        state = FleetState(settings, allow_loopback=opts.allow_loopback)
        queue: WorkQueue[str] = WorkQueue(name="fleet")
        reconcilers: list[Reconciler] = []

        def relisted(role: Role) -> None:
            for r in reconcilers:
                r.expectations.clear(role.resource.kind)

        sink = FleetSink(state, queue, on_relist=relisted)

        listed = False

        def source_error(role: Role, exc: Exception | None) -> None:
            # Before the first list, why the caches are not ready; afterwards the last good
            # view keeps being served (readiness stays: the Envoys need the ADS port).
            if not listed and exc is not None:
                hub.set_ready("cache", False, reason=f"{role.name}: {exc}")
            if standalone:
                hub.publish(store_error=None if exc is None else str(exc))

        async with trio.open_nursery() as root:
            self.http_port = await root.start(
                functools.partial(run_http, self.app, host=opts.http_host, port=opts.http_port)
            )
            if namespace_check is not None:
                hub.expect_ready("namespace")
                root.start_soon(
                    functools.partial(
                        run_namespace_check,
                        check=namespace_check,
                        namespace=settings.namespace,
                        hub=hub,
                    )
                )
            await root.start(
                supervise,
                "sources",
                hub,
                functools.partial(
                    run_sources,
                    api,
                    roles(settings),
                    namespace=settings.namespace,
                    sink=sink,
                    on_error=source_error,
                ),
            )
            listed = True
            hub.set_ready("cache", True)
            await root.start(functools.partial(run_fleet, state=state, queue=queue, feed=self.feed))
            hub.set_ready("fleet", True)
            await root.start(
                functools.partial(
                    run_xds, feed=self.feed, builder=self.builder, cache=self.cache, hub=hub
                )
            )
            await root.start(functools.partial(run_ads_tls, feed=self.feed, tls=self.ads_tls))
            self.ads_port = await root.start(
                functools.partial(
                    run_ads_server,
                    cache=self.cache,
                    host=opts.ads_host,
                    port=opts.ads_port,
                    authorizer=Authorizer(forwarder_token=settings.forwarder_token),
                    tls=self.ads_tls,
                )
            )
            hub.set_ready("ads", True)
            await root.start(
                functools.partial(run_status, feed=self.feed, hub=hub, cache=self.cache)
            )
            root.start_soon(
                supervise,
                "zone",
                hub,
                functools.partial(
                    run_zone,
                    feed=self.feed,
                    path=opts.zone_file,
                    settings=settings,
                    hub=hub,
                    leadership=leadership,
                    mirror=None if standalone else api,
                ),
            )

            async def lead() -> None:
                reconciler = Reconciler(
                    settings=settings,
                    allow_loopback=opts.allow_loopback,
                    post_event=post_event,
                )
                reconcilers.append(reconciler)
                leadership.set(True, hub)
                try:
                    loop = ReconcileLoop(
                        api=api,
                        feed=self.feed,
                        reconciler=reconciler,
                        resync_seconds=opts.resync_seconds,
                        workers=opts.reconcile_workers,
                        on_result=self._on_result,
                        on_pass=lambda doc: hub.publish(last_reconcile=doc),
                    )
                    await supervise("reconcile", hub, loop.run)
                finally:
                    reconcilers.remove(reconciler)
                    leadership.set(False, hub)

            def leadership_gate() -> LeadershipGate:
                return LeadershipGate(
                    api,
                    namespace=settings.namespace,
                    identity=opts.identity,
                    legacy_locks=opts.legacy_locks,
                    own_lease=opts.lease_name,
                    serve_only=opts.serve_only,
                    on_change=lambda doc: hub.publish(leadership=dict(doc)),
                )

            if opts.serve_only:
                # `envoy-ads`: never leads, so it never reads or writes a Lease (the
                # original's envoy-ads ServiceAccount may not); /status and the log say
                # why it does not lead, once.
                root.start_soon(leadership_gate())
            elif standalone or not opts.leader_election:
                root.start_soon(lead)
            else:

                async def election(
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                ) -> None:
                    task_status.started()
                    gate = leadership_gate()
                    await run_leader_election(
                        api,
                        name=opts.lease_name,
                        namespace=settings.namespace,
                        identity=opts.identity,
                        on_leading=lead,
                        gate=gate,
                    )

                root.start_soon(supervise, "election", hub, election)
            if self.heap is not None:
                await root.start(
                    functools.partial(run_heap, heap=self.heap, every=opts.settle_seconds)
                )
            task_status.started(self)

    def _on_result(self, result: KeyResult) -> None:
        if result.writes or result.write_errors or result.issued:
            self.hub.publish(last_key_reconcile=_result_doc(result, 0.0))
