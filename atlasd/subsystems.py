"""The daemon's subsystems that are not a package's own: each a ``run_x(*, ...,
task_status)`` the daemon declares (``atlasd.daemon``) and wires with the values it hands in.

- ``run_xds``: fleet versions -> the snapshots of the nodes they touch -> the cache the ADS
  server reads;
- ``run_ads_tls``: fleet versions -> the ADS server's TLS material;
- ``run_zone``: the zone writer, restarted with the ConfigMap mirror while leading;
- ``run_endpoints``: Thanos Query's endpoint configuration, the same way;
- ``run_namespace_check``: readiness says whether the namespace exists;
- ``run_heap``: the process's collector settles (``atlasd.heap``);
- ``run_watchdog``: the event loop's batches and what held it (``atlasd.watchdog``);
- ``run_election``: who leads, and the leader-only subsystems while this replica does;
- ``run_reconcile``: the leader's writes (one reconciler per leadership term);
- ``Leadership``: whether this replica leads (owned by the election).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from atlasd import labels, metrics
from atlasd.dns.answer import Answer
from atlasd.dns.endpoints_writer import run_endpoints_writer
from atlasd.dns.writer import Zone, ZoneUpdate, run_zone_writer
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import FleetVersion
from atlasd.heap import Heap
from atlasd.hub import AnswerDoc, LoopDoc, StatusHub
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import KubeError
from atlasd.kube.events import post_event
from atlasd.kube.lease import run_leader_election
from atlasd.kube.legacy_lock import LeadershipGate
from atlasd.model import ObjectRef, Settings
from atlasd.pacing import burst_pause, cpu_timed
from atlasd.reconcile.applier import Reconciler, ReconcileResult
from atlasd.reconcile.expectations import Expectations
from atlasd.reconcile.loop import ReconcileLoop, key_result_doc
from atlasd.supervise import supervise
from atlasd.watch.backoff import Backoff
from atlasd.watchdog import LoopWatchdog, Stall
from atlasd.xds.authz import RevokedCerts
from atlasd.xds.builders import SnapshotBuilder
from atlasd.xds.cache import LARGE_PUSH, SnapshotCache
from atlasd.xds.tls import ServerTls, TlsMaterial

log = logging.getLogger(__name__)


class Leadership:
    """Whether this replica leads. Only ``hold`` changes it (the election's ``lead``, for
    the length of a term); anyone may read ``leading`` and ``wait_changed``."""

    def __init__(self, hub: StatusHub) -> None:
        self._hub = hub
        self._leading = False
        self._changed = trio.Event()

    @property
    def leading(self) -> bool:
        return self._leading

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        self._set(True)
        try:
            yield
        finally:
            self._set(False)

    def _set(self, leading: bool) -> None:
        self._leading = leading
        metrics.LEADER.set(1 if leading else 0)
        self._hub.publish(leader=leading)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, leading: bool) -> None:
        """Return once ``leading`` is no longer what this replica's leadership is (at once
        if it already changed: a change between reading ``leading`` and waiting is not
        missed)."""
        while self._leading == leading:
            await self._changed.wait()


# -- the subsystems ---------------------------------------------------------------------------

# Builds for more changed keys than this run in a worker thread (``run_xds``).
INLINE_BUILD = 8


async def run_xds(
    *,
    feed: FleetFeed,
    builder: SnapshotBuilder,
    cache: SnapshotCache,
    hub: StatusHub,
    revoked: RevokedCerts | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fleet versions -> snapshots of the nodes they touch -> the cache the ADS server reads
    (and the revoked certificates the ADS authorizer refuses, ``revoked``).

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
        if revoked is not None and FLEET_KEY in update.changed:
            # Before any snapshot with re-issued certificates goes out: a stream standing
            # on a revoked certificate ends instead of receiving them.
            for name in revoked.update(update.version.model.revocations):
                cache.wake(name)
        build = functools.partial(builder.update, update.version.model, update.changed)
        # A start or a CA rotation touches every node: let the ADS server answer meanwhile
        # (and the leader's writes wait: ``PushBacklog``). Any build of more than a few
        # nodes runs off the event loop too: 20-100 nodes' snapshots (a CA rotation's new
        # leaves, a fleet version each 50 ms) held it 0.7-1.5 s at 2,000 clusters
        # (``atlasd.watchdog``); in a thread the loop gets the interpreter every few ms.
        large = len(update.changed) > LARGE_PUSH
        if large:
            cache.backlog.building = True
        try:
            if len(update.changed) > INLINE_BUILD:
                result, cpu = await trio.to_thread.run_sync(cpu_timed, build)
            else:
                result, cpu = cpu_timed(build)
        finally:
            if large:
                cache.backlog.building = False
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
    """The zone writer; restarted with the ConfigMap mirror while this replica leads. While
    it leads, an SRV answer that stops fitting in one DNS message is also a Warning Event
    on the fleet's CA Secret (``SrvAnswerTooLarge``)."""
    report = ZoneReport(hub)

    async def writer(
        fleets: trio.MemoryReceiveChannel[Any],
        kube: KubeApi | None,
        *,
        task_status: trio.TaskStatus[Any],
    ) -> None:
        # The names this term has posted an Event for (a new leader says it again; the
        # Event recorder counts a repeat on the existing Event).
        warned: set[str] = set()
        async with trio.open_nursery() as events:

            def on_zone(zone: Zone) -> None:
                nonlocal warned
                report.update(zone)
                if kube is None:
                    return
                for answer in zone.too_large:
                    if answer.name not in warned:
                        events.start_soon(_warn_too_large, kube, settings, answer)
                warned = {a.name for a in zone.too_large}

            await run_zone_writer(fleets=fleets, path=path, kube=kube, settings=settings,
                                  on_zone=on_zone, task_status=task_status)  # fmt: skip

    await _per_term(feed, leadership, mirror, writer, task_status=task_status)


async def run_endpoints(
    *,
    feed: FleetFeed,
    path: Path,
    settings: Settings,
    leadership: Leadership,
    configmaps: KubeApi | None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Thanos Query's endpoint configuration (``atlasd.dns.endpoints_writer``): the files
    in ``path`` on every replica, the ConfigMaps too while this replica leads."""

    async def writer(
        fleets: trio.MemoryReceiveChannel[Any],
        kube: KubeApi | None,
        *,
        task_status: trio.TaskStatus[Any],
    ) -> None:
        await run_endpoints_writer(fleets=fleets, path=path, kube=kube, settings=settings,
                                   task_status=task_status)  # fmt: skip

    await _per_term(feed, leadership, configmaps, writer, task_status=task_status)


async def _per_term(
    feed: FleetFeed,
    leadership: Leadership,
    kube: KubeApi | None,
    writer: Callable[..., Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Run ``writer(fleets, kube or None)`` fed the fleet's updates, restarted whenever
    leadership changes: only the leader writes Kubernetes objects (``kube``); every replica
    writes its files."""
    task_status.started()
    while True:
        leading = leadership.leading
        send, recv = trio.open_memory_channel[Any](64)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer, recv, kube if leading else None)

            async def forward(send: trio.MemorySendChannel[Any] = send) -> None:
                async with send:
                    async for update in feed.subscribe():
                        await send.send(ZoneUpdate(update.version.model, update.changed))

            nursery.start_soon(forward)
            await leadership.wait_changed(leading)
            nursery.cancel_scope.cancel()


async def _warn_too_large(kube: KubeApi, settings: Settings, answer: Answer) -> None:
    ref = ObjectRef(kind="Secret", name=labels.CA_SECRET, namespace=settings.namespace)
    message = (
        f"the SRV answer for {answer.name} holds {answer.records} records, {answer.bytes} "
        "bytes: more than one DNS message (65535). Thanos Query pointed at it fails every "
        "lookup; point it at the endpoint configuration (--endpoint.sd-config-file) or split "
        "the clusters into DNS groups (docs/dns.md)"
    )
    await post_event(kube, ref=ref, reason="SrvAnswerTooLarge", message=message)


class ZoneReport:
    """The zone in /status and the metrics: its serial, records and each SRV answer's size;
    an answer that stops fitting in one DNS message is logged once (until it fits again).
    Invariant: ``_too_large`` holds the names last logged as too large."""

    def __init__(self, hub: StatusHub) -> None:
        self._hub = hub
        self._names: set[str] = set()
        self._too_large: set[str] = set()

    def update(self, zone: Zone) -> None:
        for a in zone.answers:
            metrics.DNS_ANSWER_BYTES.labels(a.name).set(a.bytes)
        names = {a.name for a in zone.answers}
        for gone in self._names - names:
            metrics.DNS_ANSWER_BYTES.remove(gone)
        self._names = names
        too_large = zone.too_large
        for a in too_large:
            if a.name in self._too_large:
                continue
            log.error(
                "the SRV answer for %s holds %d records, %d bytes: more than one DNS "
                "message (65535); CoreDNS truncates it and Thanos Query fails every "
                "lookup of it. Point Thanos Query at the endpoint configuration, or split "
                "the clusters into DNS groups, one Thanos Query per group (docs/dns.md)",
                a.name,
                a.records,
                a.bytes,
            )
        self._too_large = {a.name for a in too_large}
        docs: list[AnswerDoc] = [
            {"name": a.name, "records": a.records, "bytes": a.bytes} for a in too_large
        ]
        self._hub.publish(zone={"serial": zone.serial, "records": zone.count, "too_large": docs})


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


async def run_watchdog(
    *,
    threshold: float,
    hub: StatusHub,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch this event loop (``atlasd.watchdog``); each batch over ``threshold`` s is a
    stall: counted, logged with the code that held the loop and published as status
    ``loop``."""

    def stalled(stall: Stall, stalls: int) -> None:
        doc: LoopDoc = {
            "stalls": stalls,
            "threshold_ms": round(threshold * 1000, 1),
            "last": {
                "at": stall.at,
                "held_ms": round(stall.held * 1000, 1),
                "where": stall.where or "(not sampled)",
            },
        }
        hub.publish(loop=doc)

    watchdog = LoopWatchdog(threshold=threshold, on_stall=stalled)
    watchdog.start()
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        watchdog.stop()


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
    hub.expect_ready("namespace")
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


@dataclass(frozen=True)
class Election:
    """How this replica comes to lead (``atlasd run``'s flags, the backend's abilities)."""

    api: KubeApi
    namespace: str
    identity: str
    lease_name: str
    # Contend for a Lease (else: lead at once, alone; a directory or --no-leader-election).
    use_lease: bool
    # Do not lead while the original Atlas holds one of these locks.
    legacy_locks: tuple[str, ...] = ()
    # `atlasd envoy-ads`: never lead (never read or write a Lease).
    serve_only: bool = False


async def run_election(
    *,
    election: Election,
    lead: Callable[[], Awaitable[None]],
    hub: StatusHub,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``lead()`` while this replica leads: at once when it leads alone, while it holds
    the Lease otherwise, never when it only serves (then /status and the log say why)."""
    e = election
    gate = LeadershipGate(
        e.api,
        namespace=e.namespace,
        identity=e.identity,
        legacy_locks=e.legacy_locks,
        own_lease=e.lease_name,
        serve_only=e.serve_only,
        on_change=lambda doc: hub.publish(leadership=dict(doc)),
    )
    task_status.started()
    if e.serve_only:
        await gate()
    elif not e.use_lease:
        await lead()
    else:
        await run_leader_election(
            e.api,
            name=e.lease_name,
            namespace=e.namespace,
            identity=e.identity,
            on_leading=lead,
            gate=gate,
        )


async def run_reconcile(
    *,
    api: KubeApi,
    feed: FleetFeed,
    settings: Settings,
    expectations: Expectations,
    resync_seconds: float,
    workers: int,
    hub: StatusHub,
    defer: Callable[[], bool] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The leader's writes, for one leadership term: fleet versions -> key workers -> the
    API. The term's reconciler keeps what it knows in sync across restarts of its loop.
    ``defer``: the ADS server's backlog (``PushBacklog.busy``): xDS first."""
    expectations.clear()  # a new term trusts nothing an earlier one expected
    reconciler = Reconciler(
        settings=settings,
        post_event=post_event,
        expectations=expectations,
    )
    loop = ReconcileLoop(
        api=api,
        feed=feed,
        reconciler=reconciler,
        resync_seconds=resync_seconds,
        workers=workers,
        on_result=functools.partial(_publish_key_result, hub),
        on_pass=lambda doc: hub.publish(last_reconcile=doc),
        defer=defer,
    )
    await supervise("reconcile", hub, loop.run, task_status=task_status)


def _publish_key_result(hub: StatusHub, result: ReconcileResult, seconds: float) -> None:
    doc = key_result_doc(result, seconds)
    if doc is not None:
        hub.publish(last_key_reconcile=doc)
