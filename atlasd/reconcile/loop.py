"""The leader's reconcile subsystem: keys from the fleet feed to a pool of workers.

::

    fleet feed ──changed keys──> WorkQueue ──> workers (reconcile_key) ──> API writes
        ▲                          ▲   ▲
        │                          │   └── renewal timers (add_after), expectation deadlines
        └── the watch sees writes  └── full pass: LIST, compare with the cache

- Every key a fleet version marks changed is queued; the queue coalesces bursts and hands a
  key to one worker at a time (``atlasd.watch.workqueue``). A key whose previous writes the
  cache does not show yet waits (``Expectations``); a key in sync costs a comparison.
- A **full pass** LISTs every watched role (quorum reads of metadata only: the
  resourceVersions are what is compared) and compares each key's objects with the watch
  cache: a key whose cache lags is queued, with expectations of the LISTed versions of
  atlasd's own objects (never of what users write, never older than the cache shows); a
  key the Reconciler knows in sync at exactly those versions is left alone, so a
  steady-state pass writes nothing and re-plans nothing. It runs at start (every key is
  queued then: nothing is known in sync), every ``resync_seconds``, and after a Conflict.
- Retriable API errors re-queue the key with per-key backoff; anything else propagates (the
  daemon's supervisor restarts the subsystem).
- **xDS first**: while ``defer()`` says this replica's ADS server has pushes outstanding
  (``atlasd.xds.cache.PushBacklog``), a worker waits before its next key, at most
  ``MAX_DEFER`` seconds. A fleet-wide change (an Alertmanager appearing rewrites every
  cluster's values) then reaches the Envoys first instead of sharing the event loop with
  thousands of writes that no Envoy waits for.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any

import trio

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY, OWNED_SECRETS, OWNED_SERVICES, ObjectId, key_of, roles
from atlasd.hub import ResultDoc
from atlasd.kube import bodies
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import AlreadyExists, Conflict, KubeError
from atlasd.metrics import (
    RECONCILE_DEFERRED,
    RECONCILE_ERRORS,
    RECONCILE_SECONDS,
    RECONCILE_WRITES,
)
from atlasd.model import Settings
from atlasd.reconcile.applier import Reconciler, ReconcileResult
from atlasd.watch.workqueue import WorkQueue

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 16
# The longest a worker waits for the ADS server before its next key (then it goes on).
MAX_DEFER = 10.0
DEFER_POLL = 0.02
# The roles whose objects atlasd writes: one LIST per kind.
OWNED_ROLES = frozenset({OWNED_SERVICES, OWNED_SECRETS})


@dataclass
class _Pass:
    """One full pass in progress: the keys it queued that are not done yet."""

    started: float
    outstanding: set[str]
    results: list[ReconcileResult] = field(default_factory=list)
    lists: int = 0


@dataclass(frozen=True)
class Listed:
    """A full pass's LIST. ``versions``: key -> (kind, name) -> version over every role;
    ``owned``: the same over what atlasd writes (its Services and Secrets), and ``owned_at``
    the collection resourceVersion each kind's LIST of those was served at."""

    versions: dict[str, dict[ObjectId, str]]
    owned: dict[str, dict[ObjectId, str]]
    owned_at: dict[str, str]

    def cache_leads(self, oid: ObjectId, cached: str | None) -> bool:
        """Whether the cache's ``cached`` version of the owned object ``oid`` is newer than
        the LIST of its kind (written after that LIST was served): nothing to wait for.
        ResourceVersions are opaque to clients; the API server's are etcd revisions, which
        order writes, and a version that is not a number is never judged newer."""
        listed = self.owned_at.get(oid[0], "")
        if cached is None or not (cached.isdigit() and listed.isdigit()):
            return False
        return int(cached) > int(listed)

    def expected(
        self, key: str, cached: dict[ObjectId, str], *, written: Set[ObjectId] = frozenset()
    ) -> dict[ObjectId, str | None]:
        """What the cache of ``key``'s owned objects (``cached``) must come to show before
        the key is acted on: each object at the LISTed version, each object the LIST did not
        show gone; except where the cache already shows a later write, and for the objects
        ``written`` (or deleted) while the LIST was in flight, which it may show as they
        were before (``Expectations.end_list``)."""
        want = self.owned.get(key, {})
        out: dict[ObjectId, str | None] = {
            oid: rv
            for oid, rv in want.items()
            if cached.get(oid) != rv
            and not self.cache_leads(oid, cached.get(oid))
            and oid not in written
        }
        out.update(
            {
                oid: None
                for oid, rv in cached.items()
                if oid not in want and not self.cache_leads(oid, rv) and oid not in written
            }
        )
        return out


async def listed_versions(api: KubeApi, settings: Settings) -> Listed:
    """A quorum LIST of every watched role, metadata only (what
    ``FleetVersion.object_versions`` reads from a cached version, so the two compare)."""
    out: dict[str, dict[ObjectId, str]] = {}
    owned: dict[str, dict[ObjectId, str]] = {}
    at: dict[str, str] = {}
    for role in roles(settings):
        items, rv = await api.list(
            role.resource,
            namespace=settings.namespace,
            label_selector=role.selector,
            metadata_only=True,
        )
        kind = role.resource.kind
        mine = role.name in OWNED_ROLES
        if mine:
            at[kind] = rv
        for obj in items:
            oid = (kind, bodies.name(obj))
            key = key_of(role.name, obj)
            version = bodies.resource_version(obj)
            out.setdefault(key, {})[oid] = version
            if mine:
                owned.setdefault(key, {})[oid] = version
    return Listed(out, owned, at)


class ReconcileLoop:
    """The state of the leader's reconcile subsystem (one per leadership term)."""

    def __init__(
        self,
        *,
        api: KubeApi,
        feed: FleetFeed,
        reconciler: Reconciler,
        resync_seconds: float,
        workers: int = DEFAULT_WORKERS,
        on_result: Callable[[ReconcileResult, float], None] | None = None,
        on_pass: Callable[[ResultDoc], None] | None = None,
        defer: Callable[[], bool] | None = None,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        """``wall_clock``: the time certificates are judged and issued at (tests pin it);
        ``defer``: whether a worker should wait before its next key (xDS first)."""
        self.api = api
        self.feed = feed
        self.reconciler = reconciler
        self.resync_seconds = resync_seconds
        self.workers = workers
        self.queue: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=60.0, name="reconcile")
        self._on_result = on_result
        self._on_pass = on_pass
        self._pass: _Pass | None = None
        self._pass_wanted = trio.Event()
        self._wall_clock = wall_clock
        self._defer = defer
        self.full_passes = 0

    @property
    def idle(self) -> bool:
        """Nothing to do until something changes: no full pass outstanding, no key queued,
        worked on or retrying after an error, and every write made seen by the watch cache
        (no expectation pending). Keys waiting only for their renewal time do not count."""
        q = self.queue
        return (
            self._pass is None
            and len(q) == 0
            and not q.processing
            and not q.retrying
            and len(self.reconciler.expectations) == 0
        )

    def request_full_pass(self) -> None:
        self._pass_wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        version = await self.feed.wait_published()
        sub = self.feed.subscribe()
        async with trio.open_nursery() as nursery:
            await self._full_pass(initial=True)
            nursery.start_soon(self._follow, sub)
            for _ in range(self.workers):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._resync)
            del version
            task_status.started()

    async def _follow(self, sub: Any) -> None:
        async for update in sub:
            for key in update.changed:
                self.queue.add(key)

    async def _resync(self) -> None:
        while True:
            with trio.move_on_after(self.resync_seconds):
                await self._pass_wanted.wait()
            self._pass_wanted = trio.Event()
            await self._full_pass(initial=False)

    async def _full_pass(self, *, initial: bool) -> None:
        """LIST everything (metadata only); queue every key whose cache lags or that is not
        known in sync."""
        started = time.perf_counter()
        expectations = self.reconciler.expectations
        expectations.begin_list()
        try:
            listed = await listed_versions(self.api, self.reconciler.settings)
        finally:
            written = expectations.end_list()
        cached = self.feed.latest
        assert cached is not None
        keys = set(listed.versions) | set(cached.members) | {FLEET_KEY}
        queued: set[str] = set()
        clock = trio.current_time()
        for key in keys:
            want = listed.versions.get(key, {})
            have = cached.object_versions(key)
            owned = cached.object_versions(key, owned=True)
            if want == have and not initial and self.reconciler.is_synced(key, owned):
                continue
            queued.add(key)
            if want != have and (key == FLEET_KEY or key in cached.members):
                # The cache lags the LIST: act once it shows what atlasd's own objects were
                # listed at (what a second issue of a certificate would follow from). Not
                # for what users write (a cluster Service the LIST missed or shows older is
                # simply reconciled again when its event arrives), and only for a key the
                # fleet holds (of a rejected Service's key the cache shows nothing).
                expected = listed.expected(key, owned, written=written)
                if expected:
                    log.debug("reconcile: full pass waits for the cache of %s: %s", key, expected)
                    expectations.expect(key, expected, now=clock)
        self.full_passes += 1
        self._pass = _Pass(started=started, outstanding=set(queued), lists=1)
        for key in queued:
            self.queue.add(key)
        RECONCILE_SECONDS.labels("full").observe(time.perf_counter() - started)
        log.info(
            "reconcile: full pass over %d keys (%d queued)%s",
            len(keys),
            len(queued),
            " at start" if initial else "",
        )
        if not queued:
            self._finish_pass()

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self._yield_to_xds()
                await self._one(key)
            finally:
                self.queue.done(key)

    async def _yield_to_xds(self) -> None:
        if self._defer is None or not self._defer():
            return
        t0 = trio.current_time()
        with trio.move_on_after(MAX_DEFER):
            # A poll, not an Event: the backlog changes thousands of times a second in a
            # push and turns idle by age too (no progress for a while); a few workers
            # looking every 20 ms cost less than telling them of every change.
            while self._defer():  # noqa: ASYNC110
                await trio.sleep(DEFER_POLL)
        RECONCILE_DEFERRED.inc(trio.current_time() - t0)

    async def _one(self, key: str) -> None:
        version = self.feed.latest
        assert version is not None
        t0 = time.perf_counter()
        now = self._wall_clock()
        try:
            result = await self.reconciler.reconcile_key(self.api, version, key, now=now)
        except (Conflict, AlreadyExists) as exc:
            RECONCILE_ERRORS.inc()
            log.warning("reconcile %s: %s; running a full pass", key, exc.reason)
            self.queue.add_rate_limited(key)
            self.request_full_pass()
            return
        except KubeError as exc:
            RECONCILE_ERRORS.inc()
            log.warning("reconcile %s: %s; retrying", key, exc)
            self.queue.add_rate_limited(key)
            return
        if result.events_failed:
            # An Event could not be posted (the API server unreachable): again, with backoff.
            self.queue.add_rate_limited(key)
        else:
            self.queue.forget(key)
        if result.waiting_until is not None:
            self.queue.add_after(key, max(0.0, result.waiting_until - trio.current_time()))
            self._report(result, time.perf_counter() - t0)
            return
        RECONCILE_SECONDS.labels("key").observe(time.perf_counter() - t0)
        if result.writes:
            RECONCILE_WRITES.inc(result.writes)
        if result.write_errors:
            RECONCILE_ERRORS.inc()
        if result.next_renewal is not None:
            due = (result.next_renewal - self._wall_clock()).total_seconds()
            self.queue.add_after(key, max(1.0, due))
        self._report(result, time.perf_counter() - t0)
        p = self._pass
        if p is not None and key in p.outstanding:
            p.outstanding.discard(key)
            p.results.append(result)
            if not p.outstanding:
                self._finish_pass()

    def _report(self, result: ReconcileResult, seconds: float) -> None:
        if self._on_result is not None:
            self._on_result(result, seconds)

    def _finish_pass(self) -> None:
        p = self._pass
        if p is None:
            return
        self._pass = None
        doc = result_doc(ReconcileResult.combine(p.results), time.perf_counter() - p.started)
        doc["kind"] = "full"
        doc["keys"] = len(p.results)
        if self._on_pass is not None:
            self._on_pass(doc)


def result_doc(result: ReconcileResult, seconds: float) -> ResultDoc:
    """What ``/status`` shows of one key's reconcile or of a full pass (combined)."""
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


def key_result_doc(result: ReconcileResult, seconds: float) -> ResultDoc | None:
    """``last_key_reconcile`` in ``/status``: a key's reconcile that wrote, issued or failed
    to write something (None for one that changed nothing)."""
    if not (result.writes or result.write_errors or result.issued):
        return None
    doc = result_doc(result, seconds)
    doc["key"] = result.key
    return doc
