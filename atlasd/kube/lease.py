"""Leader election on a coordination.k8s.io/v1 Lease (client-go ``tools/leaderelection``).

Owns: deciding which atlasd replica writes. Every replica runs
``run_leader_election``; the one holding the Lease runs ``on_leading`` (the guarded
work), the others keep trying.

Rules (client-go's ``tools/leaderelection/leaderelection.go``):
- timings: lease 15 s > renew deadline 10 s > 1.2 x retry period 2 s (configurable);
- a Lease held by someone else is expired when *our local time when we last saw its
  record change* plus its ``leaseDurationSeconds`` has passed; ``renewTime`` is never
  compared with our own clock (clocks skew);
- taking over (or renewing) is a PUT carrying the resourceVersion we observed; a 409
  means another replica got there first;
- the leader renews every retry period; if it cannot renew within the renew deadline,
  or sees another holder, ``on_leading`` is cancelled at once, then it goes back to
  contending;
- on a clean exit (``on_leading`` returned, raised, or the caller cancelled) the Lease
  is released (empty holder) after the guarded work has stopped, so a successor need
  not wait for expiry.

An optional ``gate`` (an async predicate returning a reason not to lead, or None; see
``atlasd.kube.legacy_lock``) is asked before every attempt to acquire and at every
renewal: while it gives a reason this replica does not contend, and a leader it stops
stops its guarded work and releases the Lease.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio

from atlasd.kube import bodies
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import AlreadyExists, Conflict, KubeError, NotFound
from atlasd.kube.resources import LEASES

log = logging.getLogger(__name__)

JITTER_FACTOR = 1.2
# While leading, how often the gate (the original Atlas's lock) is consulted.
GATE_INTERVAL = 15.0

# Why this replica may not lead now (None: it may). Must not raise KubeError.
Gate = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class LeaseTimings:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline:
            raise ValueError("lease_duration must be greater than renew_deadline")
        if not self.renew_deadline > JITTER_FACTOR * self.retry_period:
            raise ValueError("renew_deadline must be greater than 1.2 x retry_period")
        if self.retry_period <= 0:
            raise ValueError("retry_period must be positive")


@dataclass(frozen=True)
class Lost:
    """Why leadership ended; ``gated``: the gate stopped it (the Lease is still ours)."""

    reason: str
    gated: bool


@dataclass(frozen=True)
class LeaderRecord:
    """The Lease spec fields leader election reads and writes."""

    holder: str = ""
    lease_duration_seconds: int = 15
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0


def micro_time(now: dt.datetime) -> str:
    """Kubernetes MicroTime: ``2006-01-02T15:04:05.000000Z`` (UTC)."""
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_from_lease(lease: Mapping[str, Any]) -> LeaderRecord:
    spec = bodies.spec(lease)
    return LeaderRecord(
        holder=str(spec.get("holderIdentity") or ""),
        lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def lease_body(
    *, name: str, namespace: str, record: LeaderRecord, resource_version: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.lease_duration_seconds,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time:
        spec["acquireTime"] = record.acquire_time
    if record.renew_time:
        spec["renewTime"] = record.renew_time
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


class LeaderElector:
    """One replica's view of one Lease.

    Invariants: ``observed`` is the last record read or written, ``observed_at`` the
    local trio time at which it last *changed* (the basis of expiry), ``observed_rv``
    the resourceVersion any PUT must carry.
    """

    def __init__(
        self,
        kube: KubeApi,
        *,
        name: str,
        namespace: str,
        identity: str,
        timings: LeaseTimings = LeaseTimings(),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not identity:
            raise ValueError("leader election needs a non-empty identity")
        self.kube = kube
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.timings = timings
        self._wall = clock
        self.observed: LeaderRecord | None = None
        self.observed_at = -math.inf
        self.observed_rv: str | None = None

    @property
    def duration_seconds(self) -> int:
        return max(1, math.ceil(self.timings.lease_duration))

    @property
    def leader(self) -> str:
        """Who holds the Lease as last observed ("" = nobody)."""
        return self.observed.holder if self.observed else ""

    def is_leader(self) -> bool:
        return self.leader == self.identity

    def _observe(self, record: LeaderRecord, rv: str | None) -> None:
        if record != self.observed:
            self.observed = record
            self.observed_at = trio.current_time()
        self.observed_rv = rv

    def _expired(self, record: LeaderRecord) -> bool:
        return trio.current_time() >= self.observed_at + record.lease_duration_seconds

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True if this replica holds the Lease afterwards.

        While this replica holds an unexpired Lease it renews with one PUT of the record it
        last wrote (client-go's fast path); a Conflict means someone else wrote, and the
        slow path (GET, then decide) follows."""
        now = micro_time(self._wall())
        if (
            self.is_leader()
            and self.observed is not None
            and self.observed_rv
            and not self._expired(self.observed)
        ):
            mine = replace(
                self.observed, renew_time=now, lease_duration_seconds=self.duration_seconds
            )
            body = lease_body(
                name=self.name,
                namespace=self.namespace,
                record=mine,
                resource_version=self.observed_rv,
            )
            try:
                stored = await self.kube.replace(body)
            except (Conflict, NotFound):
                pass
            else:
                self._observe(mine, bodies.resource_version(stored))
                return True
        try:
            lease = await self.kube.get(LEASES, self.name, namespace=self.namespace)
        except NotFound:
            mine = LeaderRecord(self.identity, self.duration_seconds, now, now, 0)
            body = lease_body(
                name=self.name, namespace=self.namespace, record=mine, resource_version=None
            )
            try:
                created = await self.kube.create(body)
            except (AlreadyExists, Conflict):
                return False
            self._observe(mine, bodies.resource_version(created))
            return True
        record = record_from_lease(lease)
        self._observe(record, bodies.resource_version(lease))
        if record.holder and record.holder != self.identity and not self._expired(record):
            return False
        if record.holder == self.identity:
            mine = replace(record, renew_time=now, lease_duration_seconds=self.duration_seconds)
        else:
            mine = LeaderRecord(
                self.identity, self.duration_seconds, now, now, record.transitions + 1
            )
        body = lease_body(
            name=self.name, namespace=self.namespace, record=mine, resource_version=self.observed_rv
        )
        try:
            stored = await self.kube.replace(body)
        except Conflict:
            return False  # someone else wrote first: lost this round
        self._observe(mine, bodies.resource_version(stored))
        return True

    async def release(self) -> bool:
        """Give the Lease up (empty holder) if we hold it; True if released."""
        if not self.is_leader() or self.observed is None:
            return False
        record = LeaderRecord(
            holder="",
            lease_duration_seconds=1,
            acquire_time=self.observed.acquire_time,
            renew_time=micro_time(self._wall()),
            transitions=self.observed.transitions,
        )
        body = lease_body(
            name=self.name,
            namespace=self.namespace,
            record=record,
            resource_version=self.observed_rv,
        )
        try:
            stored = await self.kube.replace(body)
        except KubeError as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        self._observe(record, bodies.resource_version(stored))
        return True

    async def available(self) -> bool:
        """Whether the Lease could be taken now (absent, released, expired or ours)."""
        try:
            lease = await self.kube.get(LEASES, self.name, namespace=self.namespace)
        except NotFound:
            return True
        record = record_from_lease(lease)
        self._observe(record, bodies.resource_version(lease))
        return not record.holder or record.holder == self.identity or self._expired(record)

    async def acquire(self, gate: Gate | None = None) -> None:
        """Return once this replica holds the Lease (tries every ~retry period, and only
        while ``gate`` gives no reason not to; the gate is asked only when the Lease is
        available, so a follower costs one GET per period). A failure is logged when it
        first occurs or changes, not on every retry (a missing RBAC rule would flood the
        log)."""
        last_error = ""
        while True:
            try:
                ready = gate is None or (await self.available() and await gate() is None)
            except KubeError as exc:
                ready = False
                if str(exc) != last_error:
                    last_error = str(exc)
                    log.warning("acquiring lease %s/%s: %s", self.namespace, self.name, exc)
            if ready:
                try:
                    if await self.try_acquire_or_renew():
                        log.info(
                            "%s acquired lease %s/%s", self.identity, self.namespace, self.name
                        )
                        return
                    last_error = ""
                except KubeError as exc:
                    if str(exc) != last_error:
                        last_error = str(exc)
                        log.warning("acquiring lease %s/%s: %s", self.namespace, self.name, exc)
            period = self.timings.retry_period
            await trio.sleep(period + random.uniform(0, (JITTER_FACTOR - 1) * period))

    async def keep_renewing(self, gate: Gate | None = None) -> Lost:
        """Renew every retry period; return when leadership is lost (a renewal could not
        succeed within the renew deadline, another holder took the Lease, or ``gate``
        gave a reason to stop)."""
        t = self.timings
        gate_due = trio.current_time() + GATE_INTERVAL
        while True:
            await trio.sleep(t.retry_period)
            # The gate (the original's lock) is looked at every GATE_INTERVAL while leading.
            if (
                gate is not None
                and trio.current_time() >= gate_due
                and (stop := await gate()) is not None
            ):
                log.warning(
                    "%s steps down from lease %s/%s: %s",
                    self.identity,
                    self.namespace,
                    self.name,
                    stop,
                )
                return Lost(stop, gated=True)
            if trio.current_time() >= gate_due:
                gate_due = trio.current_time() + GATE_INTERVAL
            deadline = trio.current_time() + t.renew_deadline
            renewed = False
            with trio.move_on_at(deadline):
                while True:
                    try:
                        renewed = await self.try_acquire_or_renew()
                    except KubeError as exc:
                        log.warning("renewing lease %s/%s: %s", self.namespace, self.name, exc)
                    if renewed:
                        break
                    if self.leader and not self.is_leader():
                        break  # another replica holds it: lost, no point retrying
                    await trio.sleep(t.retry_period)
            if not renewed:
                if self.leader and not self.is_leader():
                    why = f"now held by {self.leader!r}"
                else:
                    why = f"not renewed within the {t.renew_deadline:g}s renew deadline"
                log.warning(
                    "%s lost lease %s/%s: %s", self.identity, self.namespace, self.name, why
                )
                return Lost(why, gated=False)


async def run_leader_election(
    kube: KubeApi,
    *,
    name: str,
    namespace: str,
    identity: str,
    on_leading: Callable[[], Awaitable[None]],
    timings: LeaseTimings = LeaseTimings(),
    release_on_exit: bool = True,
    gate: Gate | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Contend for the Lease forever; run ``on_leading`` while holding it (and while
    ``gate`` gives no reason not to).

    ``on_leading`` is cancelled at once when leadership is lost; then this replica
    contends again. Returns when ``on_leading`` returns; the Lease is released (when
    ``release_on_exit``) after the guarded work stopped, also when cancelled from
    outside or when ``on_leading`` raised.
    """
    elector = LeaderElector(
        kube, name=name, namespace=namespace, identity=identity, timings=timings
    )
    task_status.started()
    try:
        while True:
            await elector.acquire(gate)
            finished = False
            gated = False
            async with trio.open_nursery() as nursery:

                async def lead(scope: trio.CancelScope = nursery.cancel_scope) -> None:
                    nonlocal finished
                    await on_leading()
                    finished = True
                    scope.cancel()

                async def renew(scope: trio.CancelScope = nursery.cancel_scope) -> None:
                    nonlocal gated
                    gated = (await elector.keep_renewing(gate)).gated
                    scope.cancel()  # lost: stop the guarded work now

                nursery.start_soon(lead)
                nursery.start_soon(renew)
            if finished:
                return
            if gated and release_on_exit:
                # The guarded work has stopped: hand the Lease back at once.
                with trio.CancelScope(shield=True), trio.move_on_after(timings.retry_period * 2):
                    await elector.release()
    finally:
        if release_on_exit and elector.is_leader():
            with trio.CancelScope(shield=True), trio.move_on_after(timings.retry_period * 2):
                if await elector.release():
                    log.info("%s released lease %s/%s", identity, namespace, name)
