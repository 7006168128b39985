"""The fleet subsystem: watched objects in, keyed fleet versions out.

``FleetRunner`` owns the ``FleetState`` and its key queue; nothing else touches them. The
sources deliver into it (``changed``: the change is recorded in the state at once and its
keys are queued, ``atlasd.watch.workqueue``: bursts coalesce; ``relisted``: the leader's
expectations of that kind are met). ``run`` takes whatever keys are ready, derives them in
steps of about ``STEP_SECONDS`` (a start with thousands of clusters, a CA rotation that
re-judges every stored identity, never holds the event loop for long) and publishes each
version on the ``FleetFeed``. Each Problem is logged once, when it appears.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol

import trio
import trio.lowlevel

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import FleetState, FleetUpdate, FleetVersion
from atlasd.metrics import FLEET_SECONDS
from atlasd.model import Problem, Settings
from atlasd.watch.watched import WatchedSet
from atlasd.watch.workqueue import WorkQueue

log = logging.getLogger(__name__)

CHUNK = 250
"""The most keys derived in one step (one published version)."""

STEP_SECONDS = 0.05
"""About how long one step of derivation holds the event loop: ``FleetState.derive`` stops
after the key that passes it and the rest is derived in the next steps. Without it a new
trust bundle (a CA rotation) re-judged every stored identity in one step: 1.15-1.28 s at
2,000 clusters in the soak at scale (``atlasd.watchdog``'s stalls)."""


def _past(deadline: float) -> bool:
    return time.perf_counter() >= deadline


class Relists(Protocol):
    """What a relist meets: ``atlasd.reconcile.expectations.Expectations`` (the leader's)."""

    def clear(self, kind: str | None = None) -> None: ...


class FleetRunner:
    """The fleet: its state and key queue, fed by the sources, derived by ``run``.

    Invariant: every key whose objects changed since the last published version is in the
    queue (or being derived)."""

    def __init__(
        self,
        settings: Settings,
        *,
        feed: FleetFeed,
        allow_loopback: bool = False,
        expectations: Relists | None = None,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        """``wall_clock``: the time stored certificates are judged at (tests pin it)."""
        self._state = FleetState(settings, allow_loopback=allow_loopback)
        self._queue: WorkQueue[str] = WorkQueue(name="fleet")
        self.feed = feed
        # The leader's expectations (one object for every leadership term): a relist meets
        # those of its kind (a LIST is at least as new as any write before it).
        self._expectations = expectations
        self._wall_clock = wall_clock

    def changed(self, role: WatchedSet, name: str, obj: dict[str, object] | None) -> None:
        for key in self._state.observe(role.name, name, obj):
            self._queue.add(key)

    def relisted(self, role: WatchedSet) -> None:
        if self._expectations is not None:
            self._expectations.clear(role.resource.kind)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Derive and publish until cancelled; started once the first version (everything
        the sources listed) is published."""
        await run_fleet(
            state=self._state,
            queue=self._queue,
            feed=self.feed,
            wall_clock=self._wall_clock,
            task_status=task_status,
        )


def _problem_keys(version: FleetVersion | None, key: str) -> set[Problem]:
    if version is None:
        return set()
    if key in version.members:
        return set(version.members[key].problems)
    return set(version.fleetwide.problems) if key == FLEET_KEY else set()


def _log_new_problems(before: FleetVersion | None, update: FleetUpdate) -> None:
    for key in sorted(update.changed):
        new = _problem_keys(update.version, key) - _problem_keys(before, key)
        for p in sorted(new, key=str):
            log.warning("rejected: %s (%s)", p, p.reason, extra={"key": key})


async def run_fleet(
    *,
    state: FleetState,
    queue: WorkQueue[str],
    feed: FleetFeed,
    wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Derive and publish until cancelled; started once the first version (everything the
    sources listed) is published."""
    first = True
    while True:
        if first:
            # The fleet-wide key first: the members' trust checks need its CA.
            keys = [FLEET_KEY, *sorted(state.keys() - {FLEET_KEY})]
            # Whatever is queued now is covered by deriving every key.
            for k in queue.drain_ready():
                queue.done(k)
        else:
            key = await queue.get()
            keys = [key, *queue.drain_ready()]
        # Keys taken from the queue: each is done once derived.
        taken = set() if first else set(keys)
        pending = keys
        while pending:
            chunk, rest = pending[:CHUNK], pending[CHUNK:]
            t0 = time.perf_counter()
            enough = functools.partial(_past, t0 + STEP_SECONDS)
            update = state.derive(chunk, now=wall_clock(), enough=enough)
            FLEET_SECONDS.observe(time.perf_counter() - t0)
            before = feed.latest
            feed.publish(update)
            _log_new_problems(before, update)
            left = set(update.left)
            for k in chunk:
                if k in taken and k not in left:
                    taken.discard(k)
                    queue.done(k)
            # What the deadline left (a new trust bundle adds every member) goes first.
            pending = list(dict.fromkeys([*update.left, *rest]))
            if pending:
                await trio.lowlevel.checkpoint()
        if first:
            first = False
            task_status.started()
